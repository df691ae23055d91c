"""Memory of the daemon and of restore with one huge transaction: ``python -m bench.bigtxn``.

    python -m bench.bigtxn [--sizes-mb 200,1000] [--keep]

For each size, in a temporary directory, against ``rclone serve s3`` on 127.0.0.1:

1. A small WAL-mode database (``wal_autocheckpoint = 0``: the daemon drives checkpoints) and
   the daemon (`replicad replicate -c CONFIG`) with compaction levels of 5, 10 and 20 seconds,
   so the huge segment goes through every level within the run.  Wait for its first snapshot.
2. A writer process commits ONE transaction inserting SIZE MB of rows (half random bytes,
   half text; SQLite's default page cache, so the transaction spills into the WAL while it is
   written).  Then one small commit a second for 40 s, so the compaction buckets close; the
   slowest of those commits is reported (the daemon's checkpoints of the huge WAL must not
   hold the writer off; its busy timeout is Python's default 5 s).
3. The daemon's RSS is sampled every 100 ms from /proc: before the transaction (idle), while
   it is captured and uploaded (until the metrics report its TXID shipped), and during the
   compaction that follows; its VmHWM (peak over its life) at the end.  Bytes in its state
   directory are sampled too: its files plus the unlinked spool files the daemon holds open.
4. SIGTERM (flush), then ``replicad restore`` in a child: wall time, peak RSS (its VmHWM,
   sampled), and the restored rows compared with the source (count and SHA-256 of the
   ordered contents); ``integrity_check`` is part of the restore.

MB are 10**6 bytes.  Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import BenchError, machine, print_table, s3_env, s3_url
from tests.measure import current_rss, peak_rss, run_measured
from tests.procs import (
    Daemon,
    clean_env,
    log_tail,
    wait_for,
)
from tests.s3servers import create_bucket, start_rclone, unique_bucket

DEFAULT_SIZES_MB = (200, 1000)
ROW_BYTES = 4000
PREFIX = "apps/big"
SAMPLE_SECONDS = 0.1
AFTER_SECONDS = 40.0
TIMEOUT = 1800.0

# The writer: one transaction of SIZE bytes of rows, then one small commit a second for
# AFTER seconds.  Rows: (id, half random / half text blob); deterministic from the seed.
_WRITER = """
import random, sqlite3, sys, time
db, size, row_bytes, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rng = random.Random(7)
text = (b"replicad big transaction benchmark, ordinary text. " * 100)[: row_bytes // 2]
conn = sqlite3.connect(db, isolation_level=None)
conn.execute("PRAGMA wal_autocheckpoint=0")
conn.execute("BEGIN")
for _ in range(size // row_bytes):
    conn.execute("INSERT INTO t(b) VALUES (?)", (rng.randbytes(row_bytes - len(text)) + text,))
conn.execute("COMMIT")
print(time.time(), flush=True)
end = time.monotonic() + after
worst = 0.0
while time.monotonic() < end:
    started = time.monotonic()
    conn.execute("INSERT INTO t(b) VALUES (?)", (b"small",))
    worst = max(worst, time.monotonic() - started)
    time.sleep(1)
conn.close()
print(worst, flush=True)
"""


@dataclass(frozen=True, slots=True)
class Shipped:
    """What the daemon did with the transaction."""

    size_mb: int
    wal_mb: float
    write_seconds: float
    ship_seconds: float
    idle_rss: int
    capture_rss: int
    compaction_rss: int
    peak_rss: int
    state_peak: int
    levels: str
    worst_commit: float


@dataclass(frozen=True, slots=True)
class Result:
    """One size's run: the daemon's side and the restore's."""

    daemon: Shipped
    restore_seconds: float
    restore_rss: int
    correct: bool


def contents(db: Path) -> tuple[int, str]:
    """Rows and SHA-256 of the ordered contents."""
    digest = hashlib.sha256()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = 0
        for rowid, blob in conn.execute("SELECT id, b FROM t ORDER BY id"):
            digest.update(rowid.to_bytes(8, "little") + blob)
            rows += 1
    finally:
        conn.close()
    return rows, digest.hexdigest()


def write_config(root: Path, db: Path, url: str) -> Path:
    """The daemon's config: JSON logs, and compaction levels short enough to run here."""
    config = root / "replicad.toml"
    config.write_text(
        f"""log_format = "json"
[[databases]]
path = "{db}"
state_dir = "{root / "state"}"
  [[databases.replicas]]
  url = "{url}"
  compaction_levels = [5, 10, 20]
"""
    )
    return config


def state_bytes(pid: int, state: Path) -> int:
    """Bytes in the daemon's state directory, counting its unlinked spool files (open fds)."""
    total = sum(p.stat().st_size for p in state.glob("*") if p.is_file())
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir() if fds.exists() else ():
        try:
            target = os.readlink(fd)
            if target.startswith(str(state)) and target.endswith("(deleted)"):
                total += fd.stat().st_size
        except OSError:
            continue  # closed meanwhile
    return total


def run_one(root: Path, size_mb: int) -> Result:
    """The whole run for one transaction size, in `root`."""
    db = root / "app.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
    conn.close()
    server = start_rclone(root / "s3")
    try:
        bucket = unique_bucket()
        asyncio.run(create_bucket(server, bucket))
        url = s3_url(server, bucket, PREFIX)
        env = s3_env(server, root)
        config = write_config(root, db, url)
        daemon = Daemon.start(["-c", str(config)], root / "daemon.log", env=env)
        try:
            result = _drive(root, db, daemon, size_mb)
            daemon.stop(timeout=300, error=BenchError)
        finally:
            daemon.kill()
        out = root / "restored.db"
        run = run_measured(
            [sys.executable, "-m", "replicad", "restore", "-o", str(out), url],
            env=env,
            timeout=TIMEOUT,
        )
        if run.returncode != 0:
            raise BenchError(f"restore failed: {run.stderr[-2000:]}")
        correct = contents(out) == contents(db)
        return Result(
            result,
            restore_seconds=run.wall_seconds,
            restore_rss=run.peak_rss_bytes,
            correct=correct,
        )
    finally:
        server.stop()


def _drive(root: Path, db: Path, daemon: Daemon, size_mb: int) -> Shipped:
    """Write the huge transaction and the small ones after it; what the daemon did."""

    def snapshot_shipped() -> bool:
        daemon.check_running(BenchError)
        return daemon.metric("replicad_replica_txid") >= 1

    wait_for(snapshot_shipped, 120, "the first snapshot", log=daemon.log, error=BenchError)
    time.sleep(1)  # settle: the idle RSS is read after start-up's allocations
    idle = current_rss(daemon.proc.pid)
    state = root / "state"
    size = size_mb * 10**6
    started = time.time()
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db), str(size), str(ROW_BYTES), str(AFTER_SECONDS)],
        stdout=subprocess.PIPE,
        env=clean_env(),
        text=True,
    )
    samples: list[tuple[float, int, int]] = []  # time, daemon RSS, state bytes
    wal_peak = 0
    shipped_at = 0.0
    committed_at = 0.0
    assert writer.stdout is not None
    os.set_blocking(writer.stdout.fileno(), False)
    limit = time.monotonic() + TIMEOUT
    while writer.poll() is None or not shipped_at:
        now = time.time()
        samples.append((now, current_rss(daemon.proc.pid), state_bytes(daemon.proc.pid, state)))
        wal = db.with_name(db.name + "-wal")
        wal_peak = max(wal_peak, wal.stat().st_size if wal.exists() else 0)
        if not committed_at and (line := writer.stdout.readline()):
            committed_at = float(line)
        if committed_at and not shipped_at and daemon.metric("replicad_replica_txid") >= 3:
            shipped_at = time.time()  # snapshot 1, the transaction 2 (+ a small one)
        daemon.check_running(BenchError)
        if time.monotonic() > limit:
            raise BenchError(f"timed out\n{log_tail(daemon.log)}")
        time.sleep(SAMPLE_SECONDS)
    if writer.returncode != 0:
        raise BenchError("the writer failed")
    worst_commit = float(writer.stdout.read().split()[-1])
    # Compaction looks every 30 s and builds one level per pass: wait for the top level.
    limit = time.monotonic() + 150
    while not list((root / "s3").rglob("segments/03/*.seg")) and time.monotonic() < limit:
        samples.append(
            (time.time(), current_rss(daemon.proc.pid), state_bytes(daemon.proc.pid, state))
        )
        time.sleep(SAMPLE_SECONDS)
    peak = peak_rss(daemon.proc.pid)
    levels = sorted({p.parent.name for p in (root / "s3").rglob("*.seg")})
    return Shipped(
        size_mb=size_mb,
        wal_mb=wal_peak / 1e6,
        write_seconds=committed_at - started,
        ship_seconds=shipped_at - committed_at,
        idle_rss=idle,
        capture_rss=max(r for t, r, _ in samples if t <= shipped_at),
        compaction_rss=max((r for t, r, _ in samples if t > shipped_at), default=0),
        peak_rss=peak,
        state_peak=max(s for _, _, s in samples),
        levels=",".join(levels),
        worst_commit=worst_commit,
    )


def report(results: list[Result]) -> None:
    """Print the table."""
    mb = 1e6
    print_table(
        [
            "txn MB",
            "peak WAL MB",
            "write s",
            "commit to shipped s",
            "idle RSS MB",
            "RSS capture+upload MB",
            "RSS compaction MB",
            "VmHWM MB",
            "state dir peak MB",
            "segment levels",
            "slowest small commit ms",
            "restore s",
            "restore peak RSS MB",
            "correct",
        ],
        [
            (
                r.daemon.size_mb,
                round(r.daemon.wal_mb),
                round(r.daemon.write_seconds, 1),
                round(r.daemon.ship_seconds, 1),
                round(r.daemon.idle_rss / mb),
                round(r.daemon.capture_rss / mb),
                round(r.daemon.compaction_rss / mb),
                round(r.daemon.peak_rss / mb),
                round(r.daemon.state_peak / mb),
                r.daemon.levels,
                round(r.daemon.worst_commit * 1000, 1),
                round(r.restore_seconds, 1),
                round(r.restore_rss / mb),
                "yes" if r.correct else "NO",
            )
            for r in results
        ],
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: one run per size, then the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.bigtxn", description=__doc__)
    parser.add_argument("--sizes-mb", default=",".join(map(str, DEFAULT_SIZES_MB)))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    results = []
    for size in (int(s) for s in args.sizes_mb.split(",")):
        root = Path(tempfile.mkdtemp(prefix=f"replicad-bigtxn-{size}-"))
        try:
            results.append(run_one(root, size))
            print(f"{size} MB done", flush=True)
        finally:
            if args.keep:
                print(f"kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    report(results)
    if not all(r.correct for r in results):
        raise BenchError("a restore did not reproduce the source")


if __name__ == "__main__":
    main()
