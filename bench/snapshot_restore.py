"""Snapshot upload and restore of a large database: ``python -m bench.snapshot_restore``.

    python -m bench.snapshot_restore [--size-mb 1024] [--quick] [--keep]

One run, in a temporary directory:

1. Build a database of `--size-mb` MB (128 with `--quick`) in one connection, WAL mode: rows of
   1000 bytes (500 random, 500 of repeated text, so zstd has real work and something to
   gain), about 16 MB per transaction, then ``PRAGMA wal_checkpoint(TRUNCATE)`` so everything
   is in the main file and the WAL is empty.
2. `rclone serve s3` on 127.0.0.1; the daemon (``replicad replicate DB s3://...
   --metrics-addr ...``) takes and uploads its first snapshot.  Measured: the wall time from
   starting the process to ``replicad_replica_txid`` reaching 1 (the snapshot is uploaded;
   its log events split that into encoding to the local spool file and uploading it), the
   daemon's CPU time and peak RSS (VmHWM) then, and its RSS sampled every 0.1 s to tell the
   encoding's memory from the upload's.  Then SIGTERM: the exit status must be 0.
3. ``replicad restore -o OUT s3://...`` as a child process, twice: with the default full
   integrity check and with ``--integrity-check none``; wall time, CPU from `wait4`, peak RSS
   from the child's own VmHWM sampled every millisecond (`tests.measure.run_measured`).  The
   first result must pass ``PRAGMA integrity_check`` here too and hold exactly the source's rows.
4. The baseline: a plain aiobotocore script, also a child process, that streams each object of
   the replica prefix to a local file in 1 MiB reads, one stream per object as the restore
   does.  Reported: restore time / download time.

MB are 10**6 bytes.  Results and how to read them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aiobotocore.session import AioSession
from botocore.config import Config

from bench.common import BenchError, event_time, log_events, machine, print_table, s3_env, s3_url
from tests.measure import MeasuredRun, ProcUsage, current_rss, proc_usage, run_measured
from tests.procs import (
    HOST,
    Daemon,
    log_tail,
    wait_for,
)
from tests.s3servers import (
    REGION,
    S3Server,
    create_bucket,
    download,
    list_sizes,
    raw_client,
    start_rclone,
    unique_bucket,
)

DEFAULT_SIZE_MB = 1024
QUICK_SIZE_MB = 128
ROW_BYTES = 1000
RANDOM_BYTES = ROW_BYTES // 2
#: The compressible half of every row.
TEXT = (b"replicad snapshot benchmark: a line of ordinary, repetitive text. " * 8)[
    : ROW_BYTES - RANDOM_BYTES
]
#: Rows per build transaction: about 16 MB of payload.
ROWS_PER_TRANSACTION = 16_000
SEED = 20_240_601
PREFIX = "apps/big"
POLL_INTERVAL = 0.1
#: Seconds allowed for the snapshot upload and for each restore or download.
SNAPSHOT_TIMEOUT = 3600.0
RESTORE_TIMEOUT = 3600.0


@dataclass(frozen=True, slots=True)
class Built:
    """The source database."""

    rows: int
    size_bytes: int
    seconds: float


def build_database(db: Path, size_bytes: int) -> Built:
    """Fill a new WAL-mode database to at least `size_bytes`, then checkpoint it into the file.

    Runs in this process before any child is started, and closes its connection.
    """
    started = time.perf_counter()
    rng = random.Random(SEED)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE rows(id INTEGER PRIMARY KEY, payload BLOB)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        rows = 0
        while conn.execute("PRAGMA page_count").fetchone()[0] * page_size < size_bytes:
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO rows(payload) VALUES (?)",
                ((rng.randbytes(RANDOM_BYTES) + TEXT,) for _ in range(ROWS_PER_TRANSACTION)),
            )
            conn.execute("COMMIT")
            rows += ROWS_PER_TRANSACTION
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise BenchError("the final checkpoint of the source database was blocked")
    finally:
        conn.close()
    return Built(rows, db.stat().st_size, time.perf_counter() - started)


def read_database(db: Path) -> tuple[str, int]:
    """(``PRAGMA integrity_check`` result, row count) of a database, read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        check = "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
        rows = conn.execute("SELECT count(*) FROM rows").fetchone()[0]
    finally:
        conn.close()
    return check, rows


# -- the snapshot ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotRun:
    """The daemon's first snapshot of the database."""

    #: From starting the daemon process to the snapshot being uploaded.
    seconds: float
    #: From starting the process to the "snapshot taken" event: start-up plus encoding.
    encode_seconds: float
    #: From "snapshot taken" to "snapshot uploaded".
    upload_seconds: float
    usage: ProcUsage
    #: Largest sampled RSS before and after the encoding ended.
    encode_rss_bytes: int
    upload_rss_bytes: int
    requests: dict[str, float]
    uploaded_bytes: int


def snapshot_run(root: Path, db: Path, server: S3Server, url: str) -> SnapshotRun:
    """Start the daemon, wait for its snapshot to be uploaded, measure, SIGTERM."""
    log = root / "daemon.log"
    started = time.time()
    daemon = Daemon.start([str(db), url], log, env=s3_env(server, root))
    try:
        samples = _wait_uploaded(daemon)
        usage = proc_usage(daemon.proc.pid)
        metrics = daemon.metrics()
        daemon.stop(timeout=120, error=BenchError)
    finally:
        daemon.kill()
    taken = _event(log, "snapshot taken")
    uploaded = _event(log, "snapshot uploaded")
    return SnapshotRun(
        seconds=uploaded - started,
        encode_seconds=taken - started,
        upload_seconds=uploaded - taken,
        usage=usage,
        encode_rss_bytes=max((rss for t, rss in samples if t <= taken), default=0),
        upload_rss_bytes=max((rss for t, rss in samples if t > taken), default=0),
        requests=metrics.by_label("replicad_replica_requests_total", "operation"),
        uploaded_bytes=round(metrics.value("replicad_replica_uploaded_bytes_total")),
    )


def _wait_uploaded(daemon: Daemon) -> list[tuple[float, int]]:
    """Poll the metrics until the replica holds TXID 1; the (time, RSS) samples meanwhile."""
    samples = []

    def uploaded() -> bool:
        samples.append((time.time(), current_rss(daemon.proc.pid)))
        daemon.check_running(BenchError)
        return daemon.metric("replicad_replica_txid") >= 1

    what = "the first snapshot in the replica"
    wait_for(
        uploaded, SNAPSHOT_TIMEOUT, what, log=daemon.log, error=BenchError, interval=POLL_INTERVAL
    )
    return samples


def _event(log: Path, name: str) -> float:
    for event in log_events(log):
        if event.get("event") == name:
            return event_time(event)
    raise BenchError(f"no {name!r} event in the daemon's log\n{log_tail(log)}")


async def _list(server: S3Server, bucket: str) -> list[tuple[str, int]]:
    """(key, size) of every object under the replica prefix, straight from the server."""
    base = PREFIX + "/"
    async with raw_client(server) as s3:
        return [(base + key, size) for key, size in (await list_sizes(s3, bucket, base)).items()]


# -- restore and the raw download ------------------------------------------------------------


def restore(url: str, out: Path, env: dict[str, str], *extra: str) -> MeasuredRun:
    """``replicad restore -o OUT URL`` as a measured child process; fails the run on error."""
    cmd = [sys.executable, "-m", "replicad", "restore", "-o", str(out), url, *extra]
    result = run_measured(cmd, env=env, timeout=RESTORE_TIMEOUT)
    if result.returncode != 0:
        raise BenchError(f"restore failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def raw_download(server: S3Server, bucket: str, out: Path, env: dict[str, str]) -> MeasuredRun:
    """This module's `download` command as a measured child process."""
    cmd = [sys.executable, "-m", "bench.snapshot_restore", "download"]
    cmd += ["--endpoint", server.endpoint_url, "--bucket", bucket, "--prefix", PREFIX, str(out)]
    result = run_measured(cmd, env=env, timeout=RESTORE_TIMEOUT)
    if result.returncode != 0:
        raise BenchError(f"download failed ({result.returncode}): {result.stderr.strip()}")
    return result


async def download_objects(endpoint: str, bucket: str, prefix: str, out: Path) -> int:
    """Stream every object under `prefix` to a file in `out`, one after another; bytes read.

    The plainest client there is: credentials from the environment, path-style addressing,
    no checksums beyond what S3 requires, one GetObject per object, 1 MiB reads.
    """
    config = Config(
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = AioSession()
    async with session.create_client(
        "s3", endpoint_url=endpoint, region_name=REGION, config=config
    ) as s3:
        base = prefix.rstrip("/") + "/"
        keys = [base + key for key in await list_sizes(s3, bucket, base)]
        return await download(s3, bucket, keys, out, concurrency=1)


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    """Everything measured in one run."""

    built: Built
    objects: list[tuple[str, int]]
    snapshot: SnapshotRun
    restore_full: MeasuredRun
    restore_unchecked: MeasuredRun
    download: MeasuredRun

    @property
    def object_bytes(self) -> int:
        """Bytes in the replica."""
        return sum(size for _, size in self.objects)


def run_once(root: Path, *, size_bytes: int) -> Result:
    """Build, snapshot, restore twice, download; check the restored database."""
    db = root / "app.db"
    built = build_database(db, size_bytes)
    print(f"built {built.size_bytes / 1e6:,.0f} MB, {built.rows:,} rows in {built.seconds:.1f} s")
    server = start_rclone(root / "s3")
    try:
        bucket = unique_bucket()
        asyncio.run(create_bucket(server, bucket))
        url = s3_url(server, bucket, PREFIX)
        env = s3_env(server, root)
        snapshot = snapshot_run(root, db, server, url)
        objects = asyncio.run(_list(server, bucket))
        restored = root / "restored.db"
        restore_full = restore(url, restored, env)
        check, rows = read_database(restored)
        if check != "ok" or rows != built.rows:
            raise BenchError(f"restored database: integrity {check!r}, {rows} of {built.rows} rows")
        restored.unlink()
        restore_unchecked = restore(url, restored, env, "--integrity-check", "none")
        restored.unlink()
        downloads = root / "download"
        downloads.mkdir()
        download = raw_download(server, bucket, downloads, env)
        shutil.rmtree(downloads)
    finally:
        server.stop()
    return Result(built, objects, snapshot, restore_full, restore_unchecked, download)


# -- report ----------------------------------------------------------------------------------

SNAPSHOT_HEADERS = (
    "database (MB)",
    "rows",
    "objects",
    "replica (MB)",
    "replica/db",
    "start to uploaded (s)",
    "start + encode (s)",
    "upload (s)",
    "db MB/s",
    "daemon CPU-s",
    "peak RSS (MB)",
    "RSS encoding (MB)",
    "RSS uploading (MB)",
    "requests",
)

RESTORE_HEADERS = (
    "what",
    "wall (s)",
    "replica MB/s",
    "CPU-s",
    "peak RSS (MB)",
    "x raw download",
)


def snapshot_row(r: Result) -> list[object]:
    """The snapshot table's row."""
    s = r.snapshot
    requests = ", ".join(f"{op} {n:.0f}" for op, n in sorted(s.requests.items()))
    return [
        round(r.built.size_bytes / 1e6),
        r.built.rows,
        len(r.objects),
        round(r.object_bytes / 1e6, 1),
        round(r.object_bytes / r.built.size_bytes, 2),
        round(s.seconds, 1),
        round(s.encode_seconds, 1),
        round(s.upload_seconds, 1),
        round(r.built.size_bytes / 1e6 / s.seconds),
        round(s.usage.cpu_seconds, 1),
        round(s.usage.peak_rss_bytes / 1e6, 1),
        round(s.encode_rss_bytes / 1e6, 1),
        round(s.upload_rss_bytes / 1e6, 1),
        requests,
    ]


def restore_rows(r: Result) -> list[list[object]]:
    """The restore table: the two restores and the raw download."""
    base = r.download.wall_seconds
    runs = (
        ("restore (integrity check full)", r.restore_full),
        ("restore (--integrity-check none)", r.restore_unchecked),
        ("raw download (aiobotocore)", r.download),
    )
    return [
        [
            what,
            round(m.wall_seconds, 2),
            round(r.object_bytes / 1e6 / m.wall_seconds),
            round(m.cpu_seconds, 1),
            round(m.peak_rss_bytes / 1e6, 1),
            round(m.wall_seconds / base, 2),
        ]
        for what, m in runs
    ]


def main(argv: list[str] | None = None) -> None:
    """Run and print the tables, or (``download``) be the raw-download child."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["download"]:
        _download_main(args[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=DEFAULT_SIZE_MB, help="database size")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE_MB} MB")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parsed = parser.parse_args(args)
    size_mb = QUICK_SIZE_MB if parsed.quick else parsed.size_mb
    print(machine())
    print(
        f"{size_mb} MB database of {ROW_BYTES}-byte rows (half random), rclone serve s3 on "
        f"{HOST}, default S3 settings (8 MiB parts, 4 in flight)"
    )
    root = Path(tempfile.mkdtemp(prefix="replicad-snapshot-"))
    try:
        result = run_once(root, size_bytes=size_mb * 1_000_000)
    finally:
        if parsed.keep:
            print(f"run directory kept: {root}")
        else:
            shutil.rmtree(root)
    print_table(SNAPSHOT_HEADERS, [snapshot_row(result)])
    print()
    print_table(RESTORE_HEADERS, restore_rows(result))
    print("restored database: integrity_check ok, row count equal to the source's")


def _download_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.snapshot_restore download")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    asyncio.run(download_objects(args.endpoint, args.bucket, args.prefix, args.out))


if __name__ == "__main__":
    main()
