"""How soon after exec a stop signal is handled: ``python -m bench.signal_window``.

    python -m bench.signal_window [--runs 50]

Starts the interpreter RUNS times with the same import the `replicad` console script makes
first (``replicad.launch``, which installs the SIGTERM/SIGINT recording handlers on import) and
prints the time from just before the exec to just after that import, next to a bare
interpreter doing nothing.  Before that moment a SIGTERM takes its default action (the process
dies of it); after it, the daemon acts on it (docs/design.md, "Stopping at any moment").
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

_PRINT_NOW = "import time; print(time.monotonic())"


def _times(code: str, runs: int) -> list[float]:
    """Seconds from just before each exec to when `code` printed its clock."""
    out = []
    for _ in range(runs):
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        out.append(float(done.stdout) - started)
    return out


def main() -> None:
    """Print median, 90th percentile and maximum for both cases, in milliseconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    cases = {
        "bare interpreter (python -c)": _PRINT_NOW,
        "handlers installed (import replicad.launch)": "import replicad.launch; " + _PRINT_NOW,
    }
    print("| case | median ms | p90 ms | max ms |")
    print("|---|---|---|---|")
    for name, code in cases.items():
        t = sorted(_times(code, args.runs))
        p90 = t[int(0.9 * (len(t) - 1))]
        print(
            f"| {name} | {statistics.median(t) * 1e3:.1f} | {p90 * 1e3:.1f} | {t[-1] * 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
