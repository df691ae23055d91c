"""Start and stop real replicad and writer processes for end-to-end tests and benchmarks.

Child processes get a small, explicit environment: these machines export CA bundles, proxies
and AWS variables that must not leak into what a test measures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "tests" / "workload.py"


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment for child processes, plus `extra`."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR", "LANG") if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_daemon(
    args: list[str], log: Path, *, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`replicad replicate ARGS` in its own process, logging JSON to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "replicad", "replicate", *args, "--log-format", "json"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(env),
            cwd=ROOT,
        )


def start_writer(
    db: Path,
    log: Path,
    *,
    seed: int,
    count: int,
    rate: float,
    autocheckpoint: int | None = None,
) -> subprocess.Popen[bytes]:
    """The deterministic writer (tests/workload.py) in its own process."""
    cmd = [sys.executable, str(WORKLOAD), str(db), "--seed", str(seed), "--count", str(count)]
    cmd += ["--rate", str(rate), "--log", str(log)]
    if autocheckpoint is not None:
        cmd += ["--autocheckpoint", str(autocheckpoint)]
    return subprocess.Popen(cmd, env=clean_env(), cwd=ROOT)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """Send `sig` and wait for the exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def replicad(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a one-shot replicad command (restore, ...) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "replicad", *args],
        capture_output=True,
        text=True,
        env=clean_env(env),
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until true; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
