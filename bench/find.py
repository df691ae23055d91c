"""`replicad find` and `replicad log` over an hour of history: ``python -m bench.find``.

    python -m bench.find [--quick] [--size-mb 200] [--minutes 60] [--rate 10]
                         [--write-rate 400] [--keep]

1. **Database.**  A real SQLite database of `--size-mb` MB (40 with `--quick`), WAL mode:
   ``items(id INTEGER PRIMARY KEY, owner INTEGER, amount INTEGER, data BLOB)`` with 2000-byte
   random blobs and an index on ``owner`` (100 owners).
2. **History.**  The real daemon (``replicad replicate DB file://REPLICA``, defaults) replicates
   while this process commits `--minutes` x 60 x `--rate` one-statement transactions: an
   hour at 10 txn/s is 36,000.  They are committed at `--write-rate` per second (400: 90 s)
   instead of 10, so the replica's commit times span 90 s, not an hour; the transactions, the
   segments (the daemon batches a second of commits per segment: 400 per segment instead of 10)
   and the bytes are those of the hour.  Mix: 70% update one row's amount, 20% insert a row,
   10% delete a row; at the middle, the bad write: ``DELETE FROM items WHERE owner = 7``.
   Then SIGTERM (the daemon ships everything).
3. **find** with the real CLI, for two queries: an indexed count (``... WHERE owner = 7``)
   and a count of the whole table; wall time, CPU and peak RSS from ``wait4``; transactions per
   second and the time spent rebuilding the first state from its summary line.  Checked: the
   bad write is among the changes (after = 0).
4. **log** (full, replaying) and ``log --brief`` (trailers, ranged reads) over the whole
   history: bytes read per transaction from their summary lines.

MB are 10**6 bytes.  Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import machine, print_table
from tests.measure import MeasuredRun, run_measured
from tests.procs import start_daemon, stop, wait_for
from tests.workload import paced

OWNERS = 100
BAD_OWNER = 7
BLOB = 2000


@dataclass(frozen=True, slots=True)
class Settings:
    """One run's parameters."""

    size_mb: int
    transactions: int
    write_rate: float


def build_database(db: Path, size_mb: int, rng: random.Random) -> int:
    """Fill `db` to about `size_mb` MB; returns the number of rows."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, owner INTEGER NOT NULL, "
        "amount INTEGER NOT NULL, data BLOB NOT NULL)"
    )
    conn.execute("CREATE INDEX items_owner ON items (owner)")
    rows = size_mb * 10**6 // (BLOB + 100)
    for start in range(0, rows, 5000):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO items (owner, amount, data) VALUES (?, ?, ?)",
            (
                (rng.randrange(OWNERS), rng.randrange(10**6), rng.randbytes(BLOB))
                for _ in range(start, min(rows, start + 5000))
            ),
        )
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return rows


def write_history(db: Path, settings: Settings, rows: int, rng: random.Random) -> None:
    """Commit `settings.transactions` transactions at `settings.write_rate` per second."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    conn.execute("PRAGMA busy_timeout = 5000")
    top = rows
    try:
        for k in paced(range(1, settings.transactions + 1), settings.write_rate):
            if k == settings.transactions // 2:
                conn.execute("DELETE FROM items WHERE owner = ?", (BAD_OWNER,))
            else:
                roll = rng.random()
                if roll < 0.7:
                    conn.execute(
                        "UPDATE items SET amount = ? WHERE id = ?",
                        (rng.randrange(10**6), rng.randrange(1, top)),
                    )
                elif roll < 0.9:
                    top += 1
                    conn.execute(
                        "INSERT INTO items (id, owner, amount, data) VALUES (?, ?, ?, ?)",
                        (top, rng.randrange(OWNERS), 0, rng.randbytes(BLOB)),
                    )
                else:
                    conn.execute("DELETE FROM items WHERE id = ?", (rng.randrange(1, top),))
    finally:
        conn.close()


def replicad_cmd(*args: str) -> list[str]:
    """The command line of `python -m replicad ARGS`."""
    return [sys.executable, "-m", "replicad", *args]


def _checked(run: MeasuredRun, what: str) -> MeasuredRun:
    if run.returncode != 0:
        raise SystemExit(f"{what} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return run


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    if match is None:
        raise SystemExit(f"no {pattern!r} in {text!r}")
    return float(match[1])


def measure_find(url: str, sql: str, scratch: Path) -> list[object]:
    """`replicad find` of `sql` as a measured child; one table row."""
    run = _checked(
        run_measured(
            replicad_cmd("find", url, "--sql", sql, "--json", "--scratch-dir", str(scratch))
        ),
        f"find {sql}",
    )
    changes = [json.loads(line) for line in run.stdout.splitlines()]
    if not any(c["after"] == 0 for c in changes) and "owner" in sql:
        raise SystemExit(f"find did not report the bad write: {changes[:5]}")
    examined = _number(r"examined (\d+) transactions", run.stderr)
    base = _number(r"; ([\d.]+) s of it rebuilding", run.stderr)
    steps = run.wall_seconds - base
    return [
        sql,
        int(examined),
        len(changes),
        round(run.wall_seconds, 1),
        round(base, 1),
        round(examined / steps) if steps > 0 else "-",
        round(run.cpu_seconds, 1),
        round(run.peak_rss_bytes / 1e6),
    ]


def measure_log(url: str, scratch: Path, *, brief: bool) -> list[object]:
    """`replicad log` (full, or `brief`) as a measured child; one table row."""
    args = ["log", url, "--json"] + (["--brief"] if brief else ["--scratch-dir", str(scratch)])
    run = _checked(run_measured(replicad_cmd(*args)), "log")
    count = _number(r"replicad: (\d+) transactions", run.stderr)
    txn_bytes = _number(
        r"read (?:\d+ bytes for the state before them and )?(\d+) bytes", run.stderr
    )
    base = 0.0 if brief else _number(r"read (\d+) bytes for the state before", run.stderr)
    return [
        "log --brief" if brief else "log",
        int(count),
        round(run.wall_seconds, 1),
        round(base / 1e6, 1),
        round(txn_bytes / 1e6, 2),
        round(txn_bytes / count),
        round(run.peak_rss_bytes / 1e6),
    ]


def run(settings: Settings, workdir: Path) -> None:
    """Build the database and its history, then measure find and log over it."""
    rng = random.Random(19)
    db, replica, scratch = workdir / "app.db", workdir / "replica", workdir / "scratch"
    scratch.mkdir()
    started = time.monotonic()
    rows = build_database(db, settings.size_mb, rng)
    print(f"database: {db.stat().st_size / 1e6:.0f} MB, {rows} rows", flush=True)
    daemon = start_daemon([str(db), replica.as_uri()], workdir / "daemon.log")
    try:
        wait_for(lambda: any((replica / "snapshots").glob("*.snap")), 600, "the first snapshot")
        write_started = time.monotonic()
        write_history(db, settings, rows, rng)
        print(
            f"history: {settings.transactions} transactions in "
            f"{time.monotonic() - write_started:.0f} s",
            flush=True,
        )
    finally:
        status = stop(daemon, signal.SIGTERM, timeout=600)
    if status != 0:
        raise SystemExit(f"the daemon exited {status}")
    level0 = list((replica / "segments" / "00").glob("*.seg"))
    print(
        f"replica: {len(level0)} level-0 segments, "
        f"{sum(p.stat().st_size for p in level0) / 1e6:.1f} MB; "
        f"built in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    url = replica.as_uri()
    print_table(
        ["query", "txns", "changes", "wall s", "first state s", "txn/s", "CPU s", "peak RSS MB"],
        [
            measure_find(url, f"SELECT count(*) FROM items WHERE owner = {BAD_OWNER}", scratch),
            measure_find(url, "SELECT count(*) FROM items", scratch),
        ],
    )
    print_table(
        ["command", "txns", "wall s", "first state MB", "txn MB", "bytes/txn", "peak RSS MB"],
        [measure_log(url, scratch, brief=False), measure_log(url, scratch, brief=True)],
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse the options, run, print the tables."""
    parser = argparse.ArgumentParser(prog="python -m bench.find", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="40 MB, 5 minutes of history")
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--rate", type=float, default=10, help="history's transactions/s")
    parser.add_argument("--write-rate", type=float, default=400, help="commits/s when writing")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    size, minutes = (40, 5.0) if args.quick else (args.size_mb, args.minutes)
    settings = Settings(size, int(minutes * 60 * args.rate), args.write_rate)
    print(f"bench.find: {settings} on {machine()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-find-"))
    try:
        run(settings, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
