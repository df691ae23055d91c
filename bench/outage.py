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
import tempfile
import time
from pathlib import Path

from bench.common import BenchError, init_db, machine, print_table, s3_env, s3_url, start_writer
from tests.faultproxy import FaultProxy
from tests.procs import (
    Daemon,
    wait_for_async,
)
from tests.s3servers import create_bucket, start_rclone, unique_bucket

RATE = 50
ROW_BYTES = 200
STEADY_SECONDS = 4.0
POLL = 0.05


def _txids(daemon: Daemon) -> tuple[float, float]:
    """(captured, shipped) transaction counts from the daemon's metrics."""
    m = daemon.metrics()
    return m.value("replicad_transactions_total"), m.value("replicad_replica_txid")


async def _wait_caught_up(daemon: Daemon, captured: float, offset: float, limit: float) -> float:
    """Seconds until the replica holds the `captured`-th transaction (TXID captured + offset)."""
    started = time.monotonic()

    async def caught_up() -> bool:
        _, shipped = await asyncio.to_thread(_txids, daemon)
        return shipped - offset >= captured

    what = "the replica to catch up after the outage"
    await wait_for_async(caught_up, limit, what, log=daemon.log, error=BenchError, interval=POLL)
    return time.monotonic() - started


async def run(root: Path, outages: int, seconds: float) -> list[tuple[object, ...]]:
    """`outages` outages of `seconds` each; one row (n, seconds, catch-up) per outage."""
    server = start_rclone(root / "s3")
    bucket = unique_bucket()
    await create_bucket(server, bucket)
    proxy = FaultProxy(server.endpoint_url)
    await proxy.start()
    db = root / "app.db"
    init_db(db)
    # Runs until killed: far more rows than the run can write.
    writer = start_writer(db, root / "writer.log", rate=RATE, count=10**9, row_bytes=ROW_BYTES)
    rows: list[tuple[object, ...]] = []
    try:
        url = s3_url(server, bucket, "apps/outage", endpoint=proxy.url)
        daemon = Daemon.start([str(db), url], root / "daemon.log", env=s3_env(server, root))
        try:
            await asyncio.sleep(3)
            captured, shipped = await asyncio.to_thread(_txids, daemon)
            offset = shipped - captured  # replica TXIDs = captured count + offset
            for n in range(1, outages + 1):
                await asyncio.sleep(STEADY_SECONDS)
                proxy.pause()
                await asyncio.sleep(seconds)
                await proxy.resume()
                captured, _ = await asyncio.to_thread(_txids, daemon)
                catch_up = await _wait_caught_up(daemon, captured, offset, 120)
                rows.append((n, seconds, round(catch_up, 2)))
                print(f"outage {n}: caught up {catch_up:.2f} s after it ended", flush=True)
        finally:
            await asyncio.to_thread(daemon.stop, error=BenchError)
    finally:
        writer.kill()
        writer.wait()
        await proxy.close()
        server.stop()
    return rows


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the outages, print the table."""
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
