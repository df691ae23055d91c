"""Many databases in one process (directory mode): ``python -m bench.manydb`` from the repo root.

    python -m bench.manydb [--databases 1000] [--idle 60] [--keep]

One run: DATABASES small WAL-mode databases (one table, one row) in a temporary directory; the
daemon as its own process with one ``[[directories]]`` table replicating them to
``file:///TMP/replica`` and its metrics on loopback.  Measured: seconds from the daemon's start
to every database's first upload (each one's ``replicad_replica_txid`` >= 1), then over IDLE
seconds with no writes: the daemon's CPU seconds (user + system, from /proc), the storage
requests it made (the sum of ``replicad_replica_requests_total``), and its peak RSS (VmHWM).  The
daemon then gets SIGTERM and must exit 0.  MB are 10**6 bytes.  Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from bench.common import BenchError, machine, print_table
from tests.measure import proc_usage
from tests.procs import Daemon, Metrics


def _make(directory: Path, count: int) -> None:
    for i in range(count):
        conn = sqlite3.connect(directory / f"tenant{i:05}.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (v TEXT)")
        conn.execute("INSERT INTO t VALUES ('x')")
        conn.close()


def _requests(metrics: Metrics) -> float:
    return metrics.value("replicad_replica_requests_total")


def _all_shipped(daemon: Daemon, count: int) -> bool:
    try:
        shipped = daemon.metrics().by_label("replicad_replica_txid", "db")
    except OSError:
        return False
    return len(shipped) == count and min(shipped.values()) >= 1


def run(count: int, idle: float, workdir: Path) -> list[object]:
    """One run; returns the table row."""
    tenants = workdir / "tenants"
    replica = workdir / "replica"
    tenants.mkdir()
    replica.mkdir()
    _make(tenants, count)
    config = workdir / "replicad.toml"
    config.write_text(
        f"log_level = 'warning'\nmetrics_max_databases = {count}\n"
        f"[[directories]]\npath = '{tenants}'\npattern = '*.db'\n"
        f"[[directories.replicas]]\nurl = '{replica.as_uri()}'\n"
    )
    started = time.monotonic()
    daemon = Daemon.start(["-c", str(config)], workdir / "daemon.log")
    try:
        while not _all_shipped(daemon, count):
            daemon.check_running(BenchError)
            if time.monotonic() - started > 600:
                raise BenchError("not every database was shipped within 600 s")
            time.sleep(0.2)
        first_uploads = time.monotonic() - started
        before, requests_before = proc_usage(daemon.proc.pid), _requests(daemon.metrics())
        time.sleep(idle)  # the measurement itself: an idle period of fixed length
        after, requests_after = proc_usage(daemon.proc.pid), _requests(daemon.metrics())
        daemon.stop(timeout=300, error=BenchError)
    finally:
        daemon.kill()
    cpu_per_minute = (after.cpu_seconds - before.cpu_seconds) * 60 / idle
    return [
        count,
        round(first_uploads, 1),
        round(cpu_per_minute, 2),
        int(requests_after - requests_before),
        round(after.peak_rss_bytes / 1e6),
    ]


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="replicad-manydb-"))
    try:
        row = run(args.databases, args.idle, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(machine())
    print_table(
        [
            "databases",
            "start to all first uploads, s",
            "idle CPU s/min",
            "idle requests",
            "peak RSS MB",
        ],
        [row],
    )


if __name__ == "__main__":
    main()
