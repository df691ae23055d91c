"""What the lineage checksums (format v2) cost and save; results in docs/benchmarks.md.

    python -m bench.lineage [--part cpu|build|restart|restore] [--quick]

* cpu: the daemon at 500 txn/s of 1 KiB rows for 30 s: its CPU, and the share of it that
  keeping the database checksum current costs (pages hashed, from the daemon's own counter
  of captured bytes, times the cost of one `PageHashes.set_page`, timed here on this machine).
* build: the time to build the page-hash table of a 1 GB database at start (what a resume
  does: every page of the database file and the WAL), and to checksum a restored file.
* restart: a 200 MB database; the daemon stops cleanly; 30 s of writes at 100 txn/s and a
  TRUNCATE checkpoint (so the WAL cannot be resumed); the daemon starts again.  Bytes it
  uploads, against the changed pages and against a full snapshot.
* restore: restores of that replica with the chain proof alone, with `quick_check`, with
  the full `integrity_check`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import init_db, log_events, print_table
from bench.common import start_writer as start_rows_writer
from replicad.checksum import PageHashes, file_checksum
from replicad.db import Database
from tests.measure import proc_usage, run_measured
from tests.procs import read_metrics, start_daemon, stop, wait_for

PAGE = 4096


class BenchError(Exception):
    """A benchmark run went wrong (the message says how)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fill(db: Path, megabytes: int) -> None:
    """Make `db` about `megabytes` large (WAL mode): incompressible rows, half of the space in
    small indexed rows, so an integrity check has b-trees to walk as in a real database.
    """
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("CREATE TABLE IF NOT EXISTS rows(id INTEGER PRIMARY KEY, payload BLOB)")
    conn.execute("CREATE TABLE IF NOT EXISTS small(id INTEGER PRIMARY KEY, k INTEGER, v BLOB)")
    conn.execute("CREATE INDEX IF NOT EXISTS small_k ON small(k)")
    half = megabytes * 1024 * 1024 // 2
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO rows(payload) VALUES (randomblob(3900))", [()] * (half // 4000))
    conn.executemany(
        "INSERT INTO small(k, v) VALUES (random(), randomblob(100))", [()] * (half // 160)
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _set_page_seconds(samples: int = 200_000) -> float:
    """Seconds one `PageHashes.set_page` of a 4 KiB page takes on this machine."""
    table = PageHashes(PAGE)
    page = os.urandom(PAGE)
    table.set_size(1000)
    started = time.perf_counter()
    for i in range(samples):
        table.set_page(i % 1000 + 1, page)
    return (time.perf_counter() - started) / samples


def part_cpu(work: Path, seconds: int) -> list[list[object]]:
    """The daemon at 500 txn/s: its CPU and the share the checksum costs; table rows."""
    db, replica, dlog, wlog = work / "cpu.db", work / "cpu-rep", work / "cpu-d.log", work / "w.log"
    init_db(db)
    address = f"127.0.0.1:{_free_port()}"
    daemon = start_daemon([str(db), replica.as_uri(), "--metrics-addr", address], dlog)
    try:
        wait_for((replica / "snapshots").exists, 30, "the first snapshot")
        before = proc_usage(daemon.pid).cpu_seconds
        captured_before = read_metrics(address).value("replicad_captured_bytes_total")
        writer = start_rows_writer(db, wlog, rate=500, count=500 * seconds, row_bytes=1024)
        if writer.wait(timeout=seconds * 3) != 0:
            raise BenchError("the writer failed")
        time.sleep(2)  # the last uploads
        cpu = proc_usage(daemon.pid).cpu_seconds - before
        captured = read_metrics(address).value("replicad_captured_bytes_total") - captured_before
    finally:
        stop(daemon)
    per_page = _set_page_seconds()
    pages = captured / PAGE
    hashing = pages * per_page
    return [
        ["daemon CPU while writing, s", f"{cpu:.2f}"],
        ["pages captured (and hashed)", f"{pages:.0f}"],
        ["one set_page (hash + table update), us", f"{per_page * 1e6:.2f}"],
        ["CPU keeping the checksum, s", f"{hashing:.3f}"],
        ["share of the daemon's CPU", f"{100 * hashing / cpu:.1f} %"],
    ]


def part_build(work: Path, megabytes: int) -> list[list[object]]:
    """Building the page-hash table of a large database, and checksumming a file; rows."""
    db = work / "big.db"
    started = time.perf_counter()
    _fill(db, megabytes)
    made = time.perf_counter() - started
    rows: list[list[object]] = [[f"made a {db.stat().st_size >> 20} MB database, s", f"{made:.1f}"]]
    for attempt in (1, 2):
        database = Database(db)
        database.open()
        try:
            started = time.perf_counter()
            source = database.start_fresh(base_txid=0)
            table = database.page_hashes(source)
            seconds = time.perf_counter() - started
        finally:
            database.close()
        rows.append(
            [
                f"page-hash table at start ({table.db_pages} pages), s, run {attempt}",
                f"{seconds:.2f}",
            ]
        )
    started = time.perf_counter()
    checksum = file_checksum(db, PAGE, table.db_pages)
    rows.append(["file_checksum of the same file, s", f"{time.perf_counter() - started:.2f}"])
    if checksum != table.checksum:
        raise BenchError("the table and the file checksum disagree")
    db.unlink()
    return rows


def _objects(replica: Path) -> dict[str, int]:
    return {str(p.relative_to(replica)): p.stat().st_size for p in replica.rglob("*.s*")}


def part_restart(work: Path, megabytes: int, down: int) -> tuple[list[list[object]], Path]:
    """What a restart after writes and a TRUNCATE uploads; rows and the replica."""
    db, replica, dlog, wlog = work / "r.db", work / "r-rep", work / "r-d.log", work / "r-w.log"
    _fill(db, megabytes)
    daemon = start_daemon([str(db), replica.as_uri()], dlog)
    try:
        wait_for((replica / "snapshots").exists, 120, "the first snapshot")
        wait_for(lambda: "snapshot uploaded" in dlog.read_text(), 120, "the snapshot upload")
    finally:
        if stop(daemon) != 0:
            raise BenchError("the daemon did not stop cleanly")
    first = _objects(replica)
    snapshot_bytes = sum(size for key, size in first.items() if key.startswith("snapshots/"))
    writer = start_rows_writer(db, wlog, rate=100, count=100 * down, row_bytes=1024)
    if writer.wait(timeout=down * 3) != 0:
        raise BenchError("the writer failed")
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    daemon = start_daemon([str(db), replica.as_uri()], dlog)
    try:
        wait_for(
            lambda: (
                "without a snapshot" in dlog.read_text() or "taking a snapshot" in dlog.read_text()
            ),
            120,
            "the restart",
        )
        wait_for(lambda: len(_objects(replica)) > len(first), 60, "the restart's upload")
    finally:
        stop(daemon)
    after = _objects(replica)
    uploaded = sum(size for key, size in after.items() if key not in first)
    restart = [e for e in log_events(dlog) if "without a snapshot" in str(e.get("event"))]
    if not restart:
        raise BenchError("the daemon took a snapshot: " + json.dumps(log_events(dlog)[-5:]))
    changed = int(restart[0]["pages"])
    rows: list[list[object]] = [
        ["database, MB / pages", f"{db.stat().st_size >> 20} / {restart[0]['db_pages']}"],
        [f"writes while down ({down} s at 100 txn/s of 1 KiB rows)", 100 * down],
        ["pages that changed", changed],
        ["their raw bytes", changed * PAGE],
        ["uploaded at the restart, bytes", uploaded],
        ["a full snapshot of the database, bytes (the first start's)", snapshot_bytes],
        ["restart upload / snapshot", f"{uploaded / snapshot_bytes:.4f}"],
    ]
    return rows, replica


def part_restore(work: Path, replica: Path, runs: int) -> list[list[object]]:
    """Restores of `replica` with the chain proof, quick_check and integrity_check."""
    out = work / "restored.db"
    rows: list[list[object]] = []
    for mode in ("none", "quick", "full"):
        times, proofs = [], []
        for _ in range(runs):
            out.unlink(missing_ok=True)
            run = run_measured(
                [
                    sys.executable,
                    "-m",
                    "replicad",
                    "restore",
                    "-o",
                    str(out),
                    "--integrity-check",
                    mode,
                    replica.as_uri(),
                ]
            )
            if run.returncode != 0:
                raise BenchError(run.stderr[-2000:])
            result = json.loads(run.stdout.splitlines()[-1])
            if not result["proven"]:
                raise BenchError("the restore was not proven")
            times.append(run.wall_seconds)
            started = time.perf_counter()
            file_checksum(out, PAGE, result["pages"])
            proofs.append(time.perf_counter() - started)
        rows.append(
            [
                f"restore latest, chain proof + integrity {mode}, s",
                f"{statistics.median(times):.2f} (of {runs})",
            ]
        )
    rows.append(
        ["of which the proof (file checksum of the result), s", f"{statistics.median(proofs):.2f}"]
    )
    out.unlink(missing_ok=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Run the parts asked for and print their tables."""
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["cpu", "build", "restart", "restore"], action="append")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = p.parse_args(argv)
    parts = args.part or ["cpu", "build", "restart", "restore"]
    work = Path(tempfile.mkdtemp(prefix="bench-lineage-"))
    try:
        if "cpu" in parts:
            print("\n## checksum CPU at 500 txn/s")
            print_table(["what", "value"], part_cpu(work, 10 if args.quick else 30))
        if "build" in parts:
            print("\n## page-hash table at start")
            print_table(["what", "value"], part_build(work, 64 if args.quick else 1024))
        if "restart" in parts or "restore" in parts:
            rows, replica = part_restart(work, 32 if args.quick else 200, 5 if args.quick else 30)
            if "restart" in parts:
                print("\n## restart after writes while down")
                print_table(["what", "value"], rows)
            if "restore" in parts:
                print("\n## restore: chain proof against integrity_check")
                print_table(["what", "value"], part_restore(work, replica, 1 if args.quick else 3))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
