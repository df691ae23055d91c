"""Shared pieces of the end-to-end benchmarks: a writer process, a replica poller,
S3 replica URLs and credentials, metric scrapes, log events and measured child processes.

The benchmarks run the daemon (or another replicator) as a separate process against a database
that a separate writer process fills at a steady rate, and watch the replica from the outside,
so what they measure is what an application would see.  This module is also the writer::

    python -m bench.common init DB
    python -m bench.common write DB --rate 100 --count 3000 --row-bytes 1024 --log LOG

`init` creates DB in WAL mode with the table ``rows(id INTEGER PRIMARY KEY, payload BLOB)`` and
nothing else.  `write` commits one transaction per row (a random, incompressible payload) on a
fixed schedule, with the connection's default settings (``wal_autocheckpoint``, ``synchronous``)
as an application would have them, and logs ``k commit_time_ns start_ns`` after each COMMIT
returns, k = 1, 2, ...: when COMMIT returned, then when it was issued.  The start matters
because a replicator reading the -wal file can see a transaction before COMMIT returns (the WAL
fsync and the autocheckpoint run inside COMMIT), but never before it was issued.

Both run in their own processes, started with a clean environment: the benchmark process
itself never holds a SQLite connection while it starts children.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tests.procs import ROOT, clean_env
from tests.workload import paced

if TYPE_CHECKING:  # only for annotations: the writer process should not import aiobotocore
    from tests.s3servers import S3Server

#: How often the replica and the WAL are looked at: the resolution of a first-seen time.
DEFAULT_POLL_INTERVAL = 0.002
#: Hidden files in a local replica are in-flight writes (replicad's are `.tmp-*`), not objects.
_HIDDEN_PREFIX = "."


class BenchError(SystemExit):
    """The run went wrong; its numbers would mislead, so none are printed."""


# -- the writer process ----------------------------------------------------------------------


def init_db(db: Path) -> None:
    """Create `db` (WAL mode, empty ``rows`` table) in a child process."""
    subprocess.run(
        [sys.executable, "-m", "bench.common", "init", str(db)],
        env=clean_env(),
        cwd=ROOT,
        check=True,
        timeout=60,
    )


def start_writer(
    db: Path, log: Path, *, rate: float, count: int, row_bytes: int
) -> subprocess.Popen[bytes]:
    """Start the writer process: `count` one-row transactions at `rate` per second."""
    cmd = [sys.executable, "-m", "bench.common", "write", str(db), "--log", str(log)]
    cmd += ["--rate", str(rate), "--count", str(count), "--row-bytes", str(row_bytes)]
    return subprocess.Popen(cmd, env=clean_env(), cwd=ROOT)


def _init(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE rows(id INTEGER PRIMARY KEY, payload BLOB)")
    finally:
        conn.close()


def _write(db: Path, log_path: Path, *, rate: float, count: int, row_bytes: int) -> None:
    """Commit on an absolute schedule, so a slow commit is caught up rather than drifting."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        with log_path.open("a", buffering=1) as log:
            for k in paced(range(1, count + 1), rate):
                conn.execute("BEGIN")
                conn.execute("INSERT INTO rows(payload) VALUES (?)", (os.urandom(row_bytes),))
                start_ns = time.time_ns()
                conn.execute("COMMIT")
                log.write(f"{k} {time.time_ns()} {start_ns}\n")
    finally:
        conn.close()


@dataclass(frozen=True, slots=True)
class RunFiles:
    """The files of one run, under a directory of its own."""

    root: Path

    @property
    def db(self) -> Path:
        """The application's database."""
        return self.root / "app.db"

    @property
    def wal(self) -> Path:
        """Its -wal file."""
        return self.root / "app.db-wal"

    @property
    def writer_log(self) -> Path:
        """The writer's log: one line per commit."""
        return self.root / "writer.log"


@dataclass(frozen=True, slots=True)
class Commit:
    """One transaction of the writer."""

    k: int
    #: When COMMIT returned, Unix ns: the application's commit time.
    time_ns: int
    #: When COMMIT was issued, Unix ns: a one-row transaction writes its WAL frames in COMMIT,
    #: so no replica can hold it before this.
    start_ns: int


def read_commits(log: Path) -> list[Commit]:
    """The writer's log, in commit order."""
    commits = []
    for line in log.read_text().splitlines():
        k, time_ns, start_ns = (int(field) for field in line.split())
        commits.append(Commit(k, time_ns, start_ns))
    return commits


# -- watching from the outside ---------------------------------------------------------------


class Probe(Protocol):
    """One thing a `Poller` looks at on every tick."""

    def poll(self) -> None:
        """Look once; must be quick and must not raise for a missing file."""


class DirectoryWatch:
    """When each object of a local replica directory was first seen (Unix ns, upper bound).

    `prefix` is the key prefix the directory holds (``segments/00/``), so `first_seen()` is
    keyed by full object key.  Watch a flat directory: subdirectories are not entered.
    """

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def poll(self) -> None:
        """List the directory once and stamp the names not seen before."""
        try:
            with os.scandir(self.directory) as entries:
                names = [e.name for e in entries if not e.name.startswith(_HIDDEN_PREFIX)]
        except FileNotFoundError:
            return
        # Stamped after the listing returns: the object existed by then, maybe a little earlier.
        now = time.time_ns()
        with self._lock:
            for name in names:
                self._seen.setdefault(self.prefix + name, now)

    def first_seen(self) -> dict[str, int]:
        """Key -> first-seen time so far (a copy)."""
        with self._lock:
            return dict(self._seen)


class PeakSize:
    """The largest size a file was seen at (0 while it does not exist)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.peak = 0

    def poll(self) -> None:
        """Stat the file once."""
        with contextlib.suppress(FileNotFoundError):
            self.peak = max(self.peak, self.path.stat().st_size)


class Poller:
    """A background thread that polls its probes every `interval` seconds while in `with`."""

    def __init__(self, probes: Sequence[Probe], *, interval: float = DEFAULT_POLL_INTERVAL):
        self.probes = probes
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for probe in self.probes:
                probe.poll()


def tree_size(root: Path) -> tuple[int, int]:
    """(files, bytes) under `root`, skipping in-flight temporary files."""
    files = size = 0
    for path in _walk(root):
        files += 1
        size += path.stat().st_size
    return files, size


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if not name.startswith(_HIDDEN_PREFIX):
                yield Path(dirpath, name)


# -- reporting -------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values: the smallest value with at least
    `fraction` of them at or below it (`fraction` 0.5 is the median, 1.0 the maximum).
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    # Rounded first so that 0.9 * 100 is rank 90, not 91.
    rank = math.ceil(round(fraction * len(sorted_values), 9))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A markdown table; numeric columns right-aligned; round floats before passing them."""
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    for row in rows:
        print("| " + " | ".join(_cell(value) for value in row) + " |")


def _cell(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}"


def machine() -> str:
    """CPU model, usable CPUs, kernel, Python and SQLite versions: what the numbers depend on."""
    cpu = platform.processor() or "unknown CPU"
    with (
        contextlib.suppress(OSError, StopIteration),
        open("/proc/cpuinfo", encoding="ascii", errors="replace") as info,
    ):
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )


# -- S3 servers, the daemon's metrics and log, measured child processes ---------------------


def s3_url(server: S3Server, bucket: str, prefix: str, *, endpoint: str | None = None) -> str:
    """The replica URL of `prefix` in `bucket` on `server`, reached at `endpoint` (default: the
    server itself; pass a proxy's URL to go through it).
    """
    endpoint = endpoint or server.endpoint_url
    return f"s3://{bucket}/{prefix}?endpoint={endpoint}&path_style=true&region={server.region}"


def s3_env(server: S3Server, workdir: Path) -> dict[str, str]:
    """Credentials for `server` through the standard variables, and nothing else of this
    machine's AWS set-up: absent config files, no instance-metadata lookup.
    """
    return {
        "AWS_ACCESS_KEY_ID": server.access_key_id,
        "AWS_SECRET_ACCESS_KEY": server.secret_access_key,
        "AWS_CONFIG_FILE": str(workdir / "absent-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "absent-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def log_events(log: Path) -> list[dict[str, Any]]:
    """The JSON lines of a daemon log (``--log-format json``); other lines are skipped."""
    events = []
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


def event_time(event: dict[str, Any]) -> float:
    """A log event's ISO timestamp as Unix seconds."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


# -- command line of the child processes -----------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Entry of the child processes: `init DB` or `write DB ...`."""
    parser = argparse.ArgumentParser(prog="python -m bench.common", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the database")
    init.add_argument("db", type=Path)
    write = sub.add_parser("write", help="commit one row per transaction at a steady rate")
    write.add_argument("db", type=Path)
    write.add_argument("--log", type=Path, required=True, help="'k time_ns start_ns' lines")
    write.add_argument("--rate", type=float, required=True, help="transactions per second")
    write.add_argument("--count", type=int, required=True, help="transactions in all")
    write.add_argument("--row-bytes", type=int, default=1024, help="payload per row")
    args = parser.parse_args(argv)
    if args.command == "init":
        _init(args.db)
    else:
        _write(args.db, args.log, rate=args.rate, count=args.count, row_bytes=args.row_bytes)


if __name__ == "__main__":
    main()
