"""How fast replication catches up after the object store comes back: ``python -m bench.outage``.

    python -m bench.outage [--outages 6] [--seconds 3]

`rclone serve s3` on 127.0.0.1 behind `tests.faultproxy.FaultProxy`; the daemon replicates a
database written at 50 txn/s through the proxy.  Each round: steady writing for 4 s, then the
proxy refuses every connection for `--seconds` (an outage), then it answers again.  Measured
per round from the daemon's metrics (polled every 50 ms): *catch-up*, from the end of the
outage until the replica holds every transaction the daemon had captured when the outage
ended; and the worst lag seen (captured minus shipped, in seconds of commits at 50 txn/s).

MB are 10**6 bytes.  Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import BenchError, machine, print_table, read_metrics, s3_env, s3_url
from tests.faultproxy import FaultProxy
from tests.procs import clean_env, log_tail, start_daemon, stop
from tests.s3servers import HOST, create_bucket, free_port, start_rclone, unique_bucket

RATE = 50
STEADY_SECONDS = 4.0
POLL = 0.05

_WRITER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)")
interval = 1 / float(sys.argv[2])
next_at = time.monotonic()
while True:
    conn.execute("INSERT INTO t(v) VALUES (randomblob(200))")
    next_at += interval
    time.sleep(max(0.0, next_at - time.monotonic()))
"""


def _txids(address: str) -> tuple[float, float]:
    """(captured, shipped) transaction counts from the daemon's metrics."""
    m = read_metrics(address)
    return m.value("replicad_transactions_total"), m.value("replicad_replica_txid")


async def _wait_caught_up(address: str, captured: float, offset: float, limit: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit:
        _, shipped = await asyncio.to_thread(_txids, address)
        if shipped - offset >= captured:
            return time.monotonic() - started
        await asyncio.sleep(POLL)
    raise BenchError(f"not caught up {limit:.0f} s after the outage")


def _start_writer(db: Path) -> subprocess.Popen[bytes]:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.close()
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(db), str(RATE)], env=clean_env())


async def run(root: Path, outages: int, seconds: float) -> list[tuple[object, ...]]:
    server = start_rclone(root / "s3")
    bucket = unique_bucket()
    await create_bucket(server, bucket)
    proxy = FaultProxy(server.endpoint_url)
    await proxy.start()
    db = root / "app.db"
    writer = _start_writer(db)
    address = f"{HOST}:{free_port()}"
    log = root / "daemon.log"
    rows: list[tuple[object, ...]] = []
    try:
        url = s3_url(server, bucket, "apps/outage", endpoint=proxy.url)
        daemon = start_daemon(
            [str(db), url, "--metrics-addr", address], log, env=s3_env(server, root)
        )
        try:
            await asyncio.sleep(3)
            captured, shipped = await asyncio.to_thread(_txids, address)
            offset = shipped - captured  # replica TXIDs = captured count + offset
            for n in range(1, outages + 1):
                await asyncio.sleep(STEADY_SECONDS)
                proxy.pause()
                await asyncio.sleep(seconds)
                await proxy.resume()
                captured, _ = await asyncio.to_thread(_txids, address)
                catch_up = await _wait_caught_up(address, captured, offset, 120)
                rows.append((n, seconds, round(catch_up, 2)))
                print(f"outage {n}: caught up {catch_up:.2f} s after it ended", flush=True)
        finally:
            status = await asyncio.to_thread(stop, daemon, timeout=60)
        if status != 0:
            raise BenchError(f"daemon exited {status}\n{log_tail(log)}")
    finally:
        writer.kill()
        writer.wait()
        await proxy.close()
        server.stop()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.outage", description=__doc__)
    parser.add_argument("--outages", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    root = Path(tempfile.mkdtemp(prefix="replicad-outage-"))
    try:
        rows = asyncio.run(run(root, args.outages, args.seconds))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(["outage", "seconds down", "catch-up after it ended (s)"], rows)
    values = sorted(float(str(r[2])) for r in rows)
    print(f"median {values[len(values) // 2]:.2f} s, max {values[-1]:.2f} s")


if __name__ == "__main__":
    main()
