"""The `replicad` command's entry point: stop signals are recorded before anything slow.

Importing the command line and the daemon takes a few hundred milliseconds (structlog, zstd,
numpy, the S3 client).  A SIGTERM that arrives meanwhile (a pod deleted while it starts, a
systemd stop right after a start) would take Python's default action and kill the process with
the signal, so nothing committed while the daemon was down would be shipped and nothing would
say so.  This module imports only `signal` and, on import, installs handlers that record
SIGTERM and SIGINT; the daemon acts on what they recorded as soon as its own handlers are in
(`Daemon.serve`), and every other command gets the default behaviour back once it knows it is
not the daemon.  What remains is the interpreter's own start-up before this module runs
(docs/design.md, "Stopping at any moment").
"""

from __future__ import annotations

import signal
from types import FrameType

_received: list[signal.Signals] = []


def _record(signum: int, _frame: FrameType | None) -> None:
    _received.append(signal.Signals(signum))


for _sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_sig, _record)


def main() -> int:
    """Entry point of the `replicad` command and of `python -m replicad`."""
    from replicad.cli import main as cli_main  # noqa: PLC0415 - after the handlers, on purpose

    return cli_main(early_signals=_received)
