"""Start, watch and stop real replicad and writer processes, for end-to-end tests and benchmarks.

`Daemon` is a ``replicad replicate`` child with its metrics address and log; `wait_for` and
`wait_for_async` wait on a condition and fail with the daemon log's tail, never after a blind
sleep.

Child processes get a small, explicit environment: these machines export CA bundles, proxies
and AWS variables that must not leak into what a test measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
#: Every server and daemon in the tests and benchmarks listens here and nowhere else.
HOST = "127.0.0.1"
WORKLOAD = ROOT / "tests" / "workload.py"
#: How often `wait_for` looks at its condition.
POLL_INTERVAL = 0.02

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


@dataclass(frozen=True, slots=True)
class Metrics:
    """One scrape of the daemon's ``/metrics``: sample name and labels -> value."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """Samples called `name`, summed per value of `label`."""
        out: dict[str, float] = {}
        for (n, ls), v in self.samples.items():
            key = dict(ls).get(label)
            if n == name and key is not None:
                out[key] = out.get(key, 0.0) + v
        return out


def read_metrics(address: str, *, timeout: float = 5.0) -> Metrics:
    """Scrape ``http://ADDRESS/metrics`` (a daemon started with ``--metrics-addr ADDRESS``)."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with no_proxy.open(f"http://{address}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return Metrics(samples)


def free_port() -> int:
    """A loopback port nothing listens on right now (a server may still lose a race for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


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
    `stderr` if given).
    """
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


@dataclass(slots=True)
class Daemon:
    """A `replicad replicate` child process with its metrics address and JSON log."""

    proc: subprocess.Popen[bytes]
    address: str
    log: Path

    @classmethod
    def start(cls, args: list[str], log: Path, *, env: Mapping[str, str] | None = None) -> Daemon:
        """`replicad replicate ARGS` serving its metrics on a free loopback port."""
        address = f"{HOST}:{free_port()}"
        return cls(start_daemon([*args, "--metrics-addr", address], log, env=env), address, log)

    def metrics(self) -> Metrics:
        """A scrape of its ``/metrics``; OSError while the endpoint is not up."""
        return read_metrics(self.address)

    def metric(self, name: str, **labels: str) -> float:
        """One metric (summed over other labels); 0 while the endpoint is not up."""
        try:
            return self.metrics().value(name, **labels)
        except OSError:
            return 0.0

    def check_running(self, error: type[BaseException] = AssertionError) -> None:
        """Raise `error` with the log's tail if the process has exited."""
        if self.proc.poll() is not None:
            raise error(f"replicad exited with {self.proc.returncode}\n{log_tail(self.log)}")

    def stop(self, *, timeout: float = 60, error: type[BaseException] = AssertionError) -> None:
        """SIGTERM (a clean shutdown); raise `error` with the log's tail unless it exits 0."""
        status = stop(self.proc, timeout=timeout)
        if status != 0:
            raise error(f"replicad exited with status {status}\n{log_tail(self.log)}")

    def kill(self) -> None:
        """SIGKILL and reap, if still running (cleanup after a failure)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


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


def log_tail(log: Path, lines: int = 20) -> str:
    """The last lines of a log, for an error message."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return f"{log.name} (tail):\n" + "\n".join(text.splitlines()[-lines:])


def _timed_out(what: str, timeout: float, log: Path | None) -> str:
    message = f"timed out after {timeout:.1f}s waiting for {what}"
    return message if log is None else f"{message}\n{log_tail(log)}"


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    log: Path | None = None,
    error: type[BaseException] = AssertionError,
    interval: float = POLL_INTERVAL,
) -> None:
    """Poll `predicate` until true; after `timeout` seconds raise `error` naming `what`.

    With `log` (a daemon's, say) the message ends with its tail, so a failure says what the
    process was doing.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise error(_timed_out(what, timeout, log))
        time.sleep(interval)


async def wait_for_async(
    predicate: Callable[[], bool | Awaitable[bool]],
    within: float,
    what: str,
    *,
    log: Path | None = None,
    error: type[BaseException] = AssertionError,
    interval: float = POLL_INTERVAL,
) -> None:
    """`wait_for` inside an event loop (one that also runs a proxy or a server).

    The predicate may be a coroutine function; the loop keeps running between polls.
    """
    deadline = time.monotonic() + within
    while True:
        outcome = predicate()
        if await outcome if inspect.isawaitable(outcome) else outcome:
            return
        if time.monotonic() > deadline:
            raise error(_timed_out(what, within, log))
        # Polling other processes' files or endpoints: nothing in this process could set an Event.
        await asyncio.sleep(interval)


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` (created) with mount `options` (`size=64k`, `ro`, ...);
    skips the test where mounting is not allowed (not root, or a sandbox).
    """
    import pytest

    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=False
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs in this sandbox")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def replicated_history(tmp: Path, *, seed: int, count: int, rate: float) -> Path:
    """A replica in `tmp` of `count` workload commits at `rate`, shipped by a daemon that was
    then stopped cleanly; the database is `tmp/app.db`, the writer's log `tmp/writer.log`.
    """
    import sqlite3

    from tests import workload

    db, replica = tmp / "app.db", tmp / "replica"
    conn = sqlite3.connect(db)
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
