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

# Scripts for other SQLite users of the application's database, run with `python -c SCRIPT`.

#: A checkpointing process: PRAGMA wal_checkpoint(MODE) every INTERVAL seconds (once if 0),
#: with busy_timeout BUSY_MS; one JSON line per checkpoint to OUT; stops after the current one
#: on SIGTERM.  Arguments: DB MODE INTERVAL BUSY_MS OUT.
CHECKPOINTER = """
import json, signal, sqlite3, sys, time
db, mode, interval, busy_ms, out = sys.argv[1:6]
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
conn = sqlite3.connect(db, isolation_level=None, timeout=int(busy_ms) / 1000)
conn.execute(f"PRAGMA busy_timeout = {int(busy_ms)}")
with open(out, "a", buffering=1) as log:
    while not stopping:
        started_ns = time.time_ns()
        started = time.monotonic()
        busy, frames, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        seconds = time.monotonic() - started
        log.write(json.dumps({"mode": mode, "busy": busy, "frames": frames, "copied": copied,
                              "seconds": seconds, "start_ns": started_ns}) + "\\n")
        if float(interval) <= 0:
            break
        time.sleep(float(interval))
conn.close()
"""

#: A reader process: holds one read transaction for SECONDS (prints "reading" once it holds
#: it), then ends it and exits.  Arguments: DB SECONDS.
LONG_READER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN")
conn.execute("SELECT count(*) FROM items").fetchone()
print("reading", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
conn.close()
"""


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
    stderr: Path | None = None,
) -> subprocess.Popen[bytes]:
    """The deterministic writer (tests/workload.py) in its own process (its errors appended to
    `stderr` if given)."""
    cmd = [sys.executable, str(WORKLOAD), str(db), "--seed", str(seed), "--count", str(count)]
    cmd += ["--rate", str(rate), "--log", str(log)]
    if autocheckpoint is not None:
        cmd += ["--autocheckpoint", str(autocheckpoint)]
    if stderr is None:
        return subprocess.Popen(cmd, env=clean_env(), cwd=ROOT)
    with stderr.open("ab") as err:
        return subprocess.Popen(cmd, env=clean_env(), cwd=ROOT, stderr=err)


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


def replicated_history(tmp: Path, *, seed: int, count: int, rate: float) -> Path:
    """A replica in `tmp` of `count` workload commits at `rate`, shipped by a daemon that was
    then stopped cleanly; the database is `tmp/app.db`, the writer's log `tmp/writer.log`."""
    from tests import workload

    db, replica = tmp / "app.db", tmp / "replica"
    conn = workload.sqlite3.connect(db)
    workload.setup(conn)
    conn.close()
    daemon = start_daemon([str(db), replica.as_uri()], tmp / "daemon.log")
    try:
        wait_for(lambda: any((replica / "snapshots").glob("*.snap")), 20, "the first snapshot")
        writer = start_writer(db, tmp / "writer.log", seed=seed, count=count, rate=rate)
        assert writer.wait(timeout=60) == 0
    finally:
        assert stop(daemon) == 0
    return replica
