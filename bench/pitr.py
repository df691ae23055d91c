"""Point-in-time restore of a large database with a day of history: ``python -m bench.pitr``.

    python -m bench.pitr [--quick] [--size-mb 1024] [--hours 24] [--rate 10]
                         [--batch-seconds 5] [--keep] [--seed N]

Replaying a day at 10 txn/s through the daemon would take a day, so the replica is written
directly with the package's own encoder and compaction, object for object as the daemon would
have written it.  One run, in a temporary directory:

1. **Database.**  A real SQLite database of `--size-mb` MB (128 with `--quick`), WAL mode,
   4096-byte pages: ``blobs(id INTEGER PRIMARY KEY, data BLOB)`` with blobs of 1000-4000 bytes
   (a quarter random bytes, the rest word salad: zstd keeps 36-46% of a page), then
   ``wal_checkpoint(TRUNCATE)``.  Its pages are the snapshot at TXID 1, committed `--hours`
   ago (on an hour boundary), encoded with `ObjectWriter` and uploaded with `put_file`.
2. **History.**  `--rate` transactions per second for `--hours` hours.  Each rewrites the blob
   bytes of 1-3 distinct table leaf pages chosen uniformly at random (cell layout untouched, so
   the file stays a valid database that passes ``PRAGMA integrity_check``), and one in
   `GROW_EVERY` also grows the file by a page: a new freelist trunk page plus page 1's header
   (database size, freelist head and count).  Every change is also written (``os.pwrite``) to a
   model copy of the database file, whose SHA-256 is recorded at the TXIDs to be restored.
   Transactions are grouped into level-0 segments of `--batch-seconds` (the daemon uploads
   one a second; the default is 5 s, and 1 s with `--quick`, because `rclone serve s3` gets
   slower per PUT and per listing as a directory fills: see docs/benchmarks.md; commit times
   are evenly spaced, 100 ms apart at 10 txn/s), encoded with `encode_object` as
   `replicad.replica` does (with a plausible WAL position, which a restore does not use), spooled
   to one local file, then uploaded with `S3ReplicaClient.put_object`, `UPLOAD_CONCURRENCY`
   in flight.
3. **Compaction.**  `plan_compaction` (levels 30 s / 5 min / 1 h, settle 0, now = end of the
   history) and `compact` until nothing more is planned.  Level-0 sources come from the local
   spool, as the daemon takes them from its cache of recent uploads; higher levels are read back
   from the server, as the daemon does.  `COMPACTION_CONCURRENCY` jobs run at a time (the daemon
   runs one at a time; the objects are the same).  No snapshot but the base one: the default
   `snapshot_interval` is 24 h.
4. **Restores** with the real CLI in child processes: ``replicad restore --dry-run`` (the plan
   as JSON: objects and bytes) and then ``replicad restore -o OUT`` for the newest state,
   `POINTS` random TXIDs (``--txid``) and `POINTS` other random moments (``--timestamp``, 50 ms
   after a commit, so the expected TXID is that commit's).  Wall time, CPU and peak RSS come
   from ``/usr/bin/time -v``; the wall time is split by watching the output directory every
   5 ms: *plan* until OUT.tmp appears (start-up, listing, planning), *apply* until SQLite's
   -shm or -wal appears beside it (download, decode, write, fsync), *check* to the exit
   (``PRAGMA integrity_check``, rename).  Correct means: exit 0, the plan and the result name
   the expected TXID and the same objects and bytes, and the SHA-256 of the whole restored
   file equals the model's at that TXID.
5. **Raw download baseline** for each restore: exactly the objects of its plan, fetched to
   local files with aiobotocore over the same loopback: the snapshot streamed in 1 MiB reads,
   then the segments in `replicad.restore`'s own schedule (small objects fetched whole, up to
   `DEFAULT_PREFETCH` objects and `PREFETCH_BYTES` ahead; objects above `STREAM_ABOVE` streamed
   one at a time when their turn comes), and again all 8 at a time.  *apply/raw* is the apply
   phase over the download in the restore's schedule.

The server is `rclone serve s3` on 127.0.0.1.  MB are 10**6 bytes.  Results and how to read
them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import machine, print_table, s3_env, s3_url
from replicad.checksum import PageHashes
from replicad.clients.s3 import S3ReplicaClient
from replicad.compaction import (
    DEFAULT_LEVELS,
    DEFAULT_MAX_MERGE_BYTES,
    CompactionJob,
    compact,
    plan_compaction,
)
from replicad.format import (
    ObjectHeader,
    ObjectWriter,
    Transaction,
    TxnInfo,
    encode_object,
    object_name,
)
from replicad.position import (
    ObjectKind,
    ObjectName,
    WalPosition,
    parse_key,
)
from replicad.replicator import SNAPSHOT_GROWTH, SNAPSHOT_GROWTH_MIN_BYTES
from replicad.restore import download as restore_download
from tests.procs import ROOT, clean_env
from tests.s3servers import S3Server, create_bucket, raw_client, start_rclone, unique_bucket

DEFAULT_SIZE_MB = 1024
DEFAULT_HOURS = 24.0
DEFAULT_RATE = 10
#: Seconds of commits per level-0 segment.  The daemon uploads once a second; 86,400 objects in
#: one directory make rclone's PUTs and listings too slow for a 15-minute run (docs/benchmarks.md).
DEFAULT_BATCH_SECONDS = 5
QUICK_SIZE_MB = 128
QUICK_HOURS = 2.0
QUICK_BATCH_SECONDS = 1
PAGE_SIZE = 4096
BLOB_MIN, BLOB_MAX = 1000, 4000
#: Rows per transaction while building the database (about 10 MB).
BUILD_ROWS = 4000
#: One transaction in this many also grows the database by a page.
GROW_EVERY = 500
#: Random TXIDs restored by --txid, and again (other ones) by --timestamp.
POINTS = 3
SEED = 20_261_124
PREFIX = "apps/pitr"
UPLOAD_CONCURRENCY = 32
COMPACTION_CONCURRENCY = 4
#: The raw download's parallel variant, and its read size (replicad.clients.s3.CHUNK_SIZE).
RAW_PARALLEL = 8
RAW_CHUNK = 1 << 20
#: Where SQLite's lock-byte page sits (it is never used, but the file includes it).
PENDING_BYTE = 0x40000000
#: WAL frames after which the simulated WAL restarts (new salts) for the segment positions.
WAL_RESTART_FRAMES = 1000
RESTORE_TIMEOUT = 3600.0
#: GNU time, for the peak RSS of a child (see `measure`).
TIME = "/usr/bin/time"
SECOND_NS = 1_000_000_000


class BenchError(SystemExit):
    """The run went wrong; its numbers would mislead, so none are printed."""


# -- page content ----------------------------------------------------------------------------


class Content:
    """Blob bytes: a quarter random, three quarters word salad (zstd level 3 keeps ~46%).

    Slices of two pools at random offsets, so making a page costs a few microseconds.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.noise = rng.randbytes(16 << 20)
        vocabulary = [
            "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
            for _ in range(256)
        ]
        self.text = " ".join(rng.choices(vocabulary, k=800_000)).encode()[: 4 << 20]

    def blob(self, n: int) -> bytes:
        """`n` bytes of fresh content."""
        noisy = n // 4
        a = self.rng.randrange(len(self.noise) - noisy)
        b = self.rng.randrange(len(self.text) - (n - noisy))
        return self.noise[a : a + noisy] + self.text[b : b + n - noisy]


# -- 1. the database -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Built:
    """The source database."""

    rows: int
    pages: int
    seconds: float


def build_database(db: Path, size_bytes: int, content: Content) -> Built:
    """A WAL-mode database of at least `size_bytes`, checkpointed into the main file."""
    started = time.perf_counter()
    rng = content.rng
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE blobs(id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        rows = 0
        while conn.execute("PRAGMA page_count").fetchone()[0] * PAGE_SIZE < size_bytes:
            batch = [(content.blob(rng.randint(BLOB_MIN, BLOB_MAX)),) for _ in range(BUILD_ROWS)]
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO blobs(data) VALUES (?)", batch)
            conn.execute("COMMIT")
            rows += BUILD_ROWS
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise BenchError("wal_checkpoint(TRUNCATE) was busy")
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    finally:
        conn.close()
    if db.stat().st_size != pages * PAGE_SIZE:
        raise BenchError(f"{db} is {db.stat().st_size} bytes, not {pages} pages")
    return Built(rows, pages, time.perf_counter() - started)


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    """SQLite's big-endian varint at `at`: (value, position after it)."""
    value = 0
    for i in range(8):
        byte = buf[at + i]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + i + 1
    return (value << 8) | buf[at + 8], at + 9


def blob_ranges(db: Path) -> tuple[list[int], list[tuple[tuple[int, int], ...]]]:
    """The table leaf pages of `blobs` and, for each, where its blobs' bytes are.

    Rewriting only those bytes leaves every cell's size and the B-tree unchanged.
    """
    max_local = PAGE_SIZE - 35  # a table leaf cell's largest payload kept on the page
    leaves: list[int] = []
    ranges: list[tuple[tuple[int, int], ...]] = []
    with db.open("rb") as f:
        pgno = 0
        while chunk := f.read(1024 * PAGE_SIZE):
            for start in range(0, len(chunk), PAGE_SIZE):
                pgno += 1
                page = chunk[start : start + PAGE_SIZE]
                if pgno == 1 or page[0] != 0x0D:
                    continue  # the schema page, interior pages, the lock-byte page
                cells = []
                for i in range(int.from_bytes(page[3:5], "big")):
                    at = int.from_bytes(page[8 + 2 * i : 10 + 2 * i], "big")
                    payload, at = _varint(page, at)
                    _, at = _varint(page, at)  # rowid
                    header_size, body = _varint(page, at)
                    id_type, body = _varint(page, body)
                    blob_type, _ = _varint(page, body)
                    if payload > max_local or id_type != 0 or blob_type < 12 or blob_type % 2:
                        raise BenchError(f"page {pgno}: unexpected cell layout")
                    cells.append((at + header_size, (blob_type - 12) // 2))
                if cells:
                    leaves.append(pgno)
                    ranges.append(tuple(cells))
    return leaves, ranges


# -- 2. the history --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timeline:
    """When each transaction committed.  TXID 1 is the snapshot at `t0_ns`; the history is
    TXIDs 2..`last_txid`, evenly spaced, the n-th (from 0) at t0 + (n + 1/2) intervals, so each
    segment's commits sit inside one second-aligned batch and compaction buckets split evenly.
    """

    t0_ns: int
    interval_ns: int
    transactions: int
    per_segment: int

    @property
    def last_txid(self) -> int:
        return self.transactions + 1

    @property
    def end_ns(self) -> int:
        return self.t0_ns + self.transactions * self.interval_ns

    @property
    def segments(self) -> int:
        return -(-self.transactions // self.per_segment)

    def commit_ns(self, txid: int) -> int:
        if txid == 1:
            return self.t0_ns
        return self.t0_ns + (txid - 2) * self.interval_ns + self.interval_ns // 2


class Model:
    """The database file as of the last TXID applied: a copy of the base, changed in place."""

    def __init__(
        self, path: Path, leaves: list[int], ranges: list[tuple[tuple[int, int], ...]]
    ) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self.leaves = leaves
        self.ranges = ranges
        self.db_pages = os.fstat(self.fd).st_size // PAGE_SIZE
        self.pending_page = PENDING_BYTE // PAGE_SIZE + 1

    def close(self) -> None:
        os.close(self.fd)

    def _read(self, pgno: int) -> bytearray:
        return bytearray(os.pread(self.fd, PAGE_SIZE, (pgno - 1) * PAGE_SIZE))

    def _write(self, pgno: int, page: bytes | bytearray) -> None:
        if os.pwrite(self.fd, page, (pgno - 1) * PAGE_SIZE) != PAGE_SIZE:
            raise BenchError("short write to the model")

    def rewrite(self, leaf: int, content: Content) -> tuple[int, bytes]:
        """New content for every blob on the `leaf`-th table leaf page; (pgno, page)."""
        pgno = self.leaves[leaf]
        page = self._read(pgno)
        for at, length in self.ranges[leaf]:
            page[at : at + length] = content.blob(length)
        data = bytes(page)
        self._write(pgno, data)
        return pgno, data

    def grow(self) -> list[tuple[int, bytes]]:
        """Append a page as the new head of the freelist trunk chain; page 1 says so."""
        new = self.db_pages + 1
        if new == self.pending_page:
            new += 1  # SQLite never uses the lock-byte page; it stays a hole of zeros
        header = self._read(1)
        trunk = bytearray(PAGE_SIZE)
        trunk[0:4] = header[32:36]  # next trunk: the old head; 0 leaves
        header[28:32] = new.to_bytes(4, "big")  # in-header database size
        header[32:36] = new.to_bytes(4, "big")  # first freelist trunk page
        count = int.from_bytes(header[36:40], "big") + 1
        header[36:40] = count.to_bytes(4, "big")  # freelist pages
        self._write(new, trunk)
        self._write(1, header)
        self.db_pages = new
        return [(1, bytes(header)), (new, bytes(trunk))]

    def sha256(self) -> str:
        digest = hashlib.sha256()
        size = self.db_pages * PAGE_SIZE
        for offset in range(0, size, 8 << 20):
            digest.update(os.pread(self.fd, min(8 << 20, size - offset), offset))
        return digest.hexdigest()


@dataclass(slots=True)
class WalSim:
    """A plausible WAL position after each segment (written into headers, unused by restore)."""

    rng: random.Random
    salt1: int = 0x1F2E3D4C
    salt2: int = 0x5A6B7C8D
    frames: int = 0

    def advance(self, frames: int, txid: int) -> WalPosition:
        self.frames += frames
        position = WalPosition(
            self.salt1,
            self.salt2,
            32 + self.frames * (24 + PAGE_SIZE),
            zlib.crc32(txid.to_bytes(8, "little")),
            zlib.crc32(txid.to_bytes(8, "big")),
        )
        if self.frames >= WAL_RESTART_FRAMES:  # a checkpoint restarted the WAL
            self.salt1 = (self.salt1 + 1) & 0xFFFFFFFF
            self.salt2 = self.rng.getrandbits(32)
            self.frames = 0
        return position


@dataclass(frozen=True, slots=True)
class Spooled:
    """An object encoded to the local spool file, not yet (or already) uploaded."""

    name: ObjectName
    offset: int
    size: int


@dataclass
class History:
    """What generating the history produced."""

    segments: list[Spooled]
    #: TXID -> (SHA-256 of the model file then, its size in bytes).
    expected: dict[int, tuple[str, int]]
    pages_written: int
    grows: int
    raw_bytes: int
    seconds: float
    hash_seconds: float
    final_pages: int
    #: Snapshots the daemon takes once the pages captured since the last one outgrow it
    #: (`replicad.replicator.SNAPSHOT_GROWTH`): (name, local file, size).
    snapshots: list[tuple[ObjectName, Path, int]]


def generate_history(
    model: Model,
    timeline: Timeline,
    content: Content,
    spool: Path,
    check_txids: set[int],
    *,
    hashes: PageHashes,
) -> History:
    """Every transaction of the history: applied to the model, encoded into level-0 segments
    appended to `spool`; the model's SHA-256 recorded after each TXID in `check_txids`.

    `hashes` (the base database's page hashes) is kept current, so every object records the
    database checksums (format v2) as the daemon's do.  A snapshot of the model is written
    next to `spool` whenever the daemon would take one: once the pages captured since the last
    snapshot reach `SNAPSHOT_GROWTH` times its size (at least `SNAPSHOT_GROWTH_MIN_BYTES`).
    """
    started = time.perf_counter()
    rng = content.rng
    wal = WalSim(random.Random(rng.getrandbits(32)))
    expected: dict[int, tuple[str, int]] = {}
    segments: list[Spooled] = []
    pages_written = grows = raw = 0
    hash_seconds = 0.0
    offset = 0
    txid = 2
    leaves = len(model.leaves)
    snapshots: list[tuple[ObjectName, Path, int]] = []
    since_snapshot, snapshot_bytes = 0, model.db_pages * PAGE_SIZE
    with spool.open("wb") as out:
        while txid <= timeline.last_txid:
            last = min(txid + timeline.per_segment - 1, timeline.last_txid)
            txns: list[Transaction] = []
            frames = 0
            pre = hashes.checksum
            for k in range(txid, last + 1):
                pages: list[tuple[int, bytes]] = []
                if rng.randrange(GROW_EVERY) == 0:
                    pages += model.grow()
                    grows += 1
                for leaf in rng.sample(range(leaves), rng.randint(1, 3)):
                    pages.append(model.rewrite(leaf, content))
                for pgno, data in pages:
                    hashes.set_page(pgno, data)
                info = TxnInfo(k, timeline.commit_ns(k), model.db_pages, len(pages))
                txns.append(Transaction(info, pages, hashes.checksum))
                frames += len(pages)
                if k in check_txids:
                    hashing = time.perf_counter()
                    expected[k] = (model.sha256(), model.db_pages * PAGE_SIZE)
                    hash_seconds += time.perf_counter() - hashing
            first_ns, last_ns = txns[0].info.commit_time_ns, txns[-1].info.commit_time_ns
            header = ObjectHeader(
                kind=ObjectKind.SEGMENT,
                page_size=PAGE_SIZE,
                level=0,
                first_txid=txid,
                last_txid=last,
                min_time_ns=first_ns,
                max_time_ns=last_ns,
                db_pages=model.db_pages,
                position=wal.advance(frames, last),
                pre_checksum=pre,
                post_checksum=hashes.checksum,
            )
            data = encode_object(header, txns)
            out.write(data)
            segments.append(Spooled(object_name(header), offset, len(data)))
            offset += len(data)
            pages_written += frames
            raw += frames * PAGE_SIZE
            since_snapshot += frames * PAGE_SIZE
            txid = last + 1
            if since_snapshot >= max(SNAPSHOT_GROWTH * snapshot_bytes, SNAPSHOT_GROWTH_MIN_BYTES):
                path = spool.with_name(f"snapshot-{last}.tmp")
                name, size = write_snapshot(model.path, path, last, last_ns, hashes.checksum)
                snapshots.append((name, path, size))
                since_snapshot, snapshot_bytes = 0, model.db_pages * PAGE_SIZE
    return History(
        segments,
        expected,
        pages_written,
        grows,
        raw,
        time.perf_counter() - started,
        hash_seconds,
        model.db_pages,
        snapshots,
    )


def write_snapshot(
    db: Path, out: Path, txid: int, t_ns: int, checksum: int
) -> tuple[ObjectName, int]:
    """A snapshot of `db`'s pages at `txid` (committed and taken at `t_ns`, database checksum
    `checksum`), as the daemon writes it.
    """
    pages = db.stat().st_size // PAGE_SIZE
    header = ObjectHeader(
        kind=ObjectKind.SNAPSHOT,
        page_size=PAGE_SIZE,
        level=0,
        first_txid=txid,
        last_txid=txid,
        min_time_ns=t_ns,
        max_time_ns=t_ns,
        db_pages=pages,
        position=None,  # (a restore does not use it)
        pre_checksum=0,
        post_checksum=checksum,
    )
    with db.open("rb") as source, out.open("wb") as sink:
        writer = ObjectWriter(sink, header)
        writer.begin_transaction(txid, t_ns, pages, pages, checksum)
        for pgno in range(1, pages + 1):
            writer.add_page(pgno, source.read(PAGE_SIZE))
        size = writer.finish()
    return object_name(header), size


class SpoolCache(Mapping[ObjectName, bytes]):
    """The spooled level-0 segments by name: what the daemon's cache of recent uploads holds."""

    def __init__(self, spool: Path, segments: Sequence[Spooled]) -> None:
        self._fd = os.open(spool, os.O_RDONLY)
        self._where = {s.name: (s.offset, s.size) for s in segments}

    def __getitem__(self, name: ObjectName) -> bytes:
        offset, size = self._where[name]
        return os.pread(self._fd, size, offset)

    def __iter__(self) -> Iterator[ObjectName]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True, slots=True)
class Upload:
    """How the level-0 upload went."""

    seconds: float
    #: Objects per second over the first and the last tenth of the objects.
    first_rate: float
    last_rate: float


async def upload_segments(
    client: S3ReplicaClient, cache: SpoolCache, segments: Sequence[Spooled]
) -> Upload:
    """PUT every spooled segment, `UPLOAD_CONCURRENCY` in flight."""
    started = time.perf_counter()
    queue = iter(segments)
    done: list[float] = []

    async def worker() -> None:
        for item in queue:
            await client.put_object(item.name.key, cache[item.name])
            done.append(time.perf_counter())

    await asyncio.gather(*(worker() for _ in range(UPLOAD_CONCURRENCY)))
    tenth = max(1, len(done) // 10)
    first = tenth / (done[tenth - 1] - started)
    last = tenth / (done[-1] - done[-tenth - 1]) if len(done) > tenth else first
    return Upload(done[-1] - started, first, last)


@dataclass
class Compaction:
    """What running compaction to the end produced."""

    jobs: dict[int, int] = field(default_factory=dict)
    rounds: int = 0
    seconds: float = 0.0
    plan_seconds: float = 0.0


async def compact_all(
    client: S3ReplicaClient, objects: dict[ObjectName, int], cache: SpoolCache, now_ms: int
) -> Compaction:
    """Plan and run compaction jobs until none is planned; `objects` gains the outputs."""
    result = Compaction()
    started = time.perf_counter()
    while True:
        planning = time.perf_counter()
        jobs = plan_compaction(objects, levels=DEFAULT_LEVELS, now_ms=now_ms, settle_ms=0)
        result.plan_seconds += time.perf_counter() - planning
        if not jobs:
            break
        result.rounds += 1
        queue: Iterator[CompactionJob] = iter(jobs)

        async def worker(queue: Iterator[CompactionJob] = queue) -> None:
            for job in queue:
                for name, size in await compact(client, job, cache=cache):
                    objects[name] = size
                result.jobs[job.level] = result.jobs.get(job.level, 0) + 1

        await asyncio.gather(*(worker() for _ in range(COMPACTION_CONCURRENCY)))
    result.seconds = time.perf_counter() - started
    return result


# -- 3. restores -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    """One restore: what to ask for and which TXID must come out."""

    label: str
    args: tuple[str, ...]
    txid: int


@dataclass(frozen=True, slots=True)
class Measured:
    """A child process run to completion."""

    returncode: int
    wall_seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    stdout: str
    stderr: str
    #: For a restore: when OUT.tmp appeared (start-up, listing and planning done), and when
    #: SQLite's -shm/-wal beside it did (pages written and fsynced; the integrity check starts).
    tmp_at: float | None = None
    check_at: float | None = None


def _status_kb(pid: int, field_name: str) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def measure(cmd: list[str], env: dict[str, str], out: Path | None = None) -> Measured:
    """Run `cmd` (clean environment plus `env`, repository root as cwd) and measure it.

    Peak RSS comes from ``/usr/bin/time -v`` (else from polling VmHWM): `wait4`'s ru_maxrss for
    a child of this process is at least this process's RSS at the fork, as Linux carries the
    forked copy's high-water mark across exec, so `bench.common.run_measured` cannot tell a
    restore's memory.  With `out`, OUT.tmp and its SQLite sidecars are watched every 5 ms to
    split a restore's wall time into planning, applying and checking.
    """
    timed = os.path.exists(TIME)
    tmp = out.with_name(out.name + ".tmp") if out else None
    sidecars = [tmp.with_name(tmp.name + s) for s in ("-shm", "-wal")] if tmp else []
    tmp_at = check_at = None
    polled_hwm = 0
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [TIME, "-v", *cmd] if timed else cmd,
            stdout=stdout,
            stderr=stderr,
            env=clean_env(env),
            cwd=ROOT,
        )
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            now = time.perf_counter() - started
            if pid:
                break
            if now > RESTORE_TIMEOUT:
                proc.kill()
            if tmp is not None and tmp_at is None and tmp.exists():
                tmp_at = now
            if tmp_at is not None and check_at is None and any(s.exists() for s in sidecars):
                check_at = now
            if not timed:
                polled_hwm = max(polled_hwm, _status_kb(proc.pid, "VmHWM"))
            time.sleep(0.005)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        out_text = stdout.read().decode(errors="replace")
        err_text = stderr.read().decode(errors="replace")
    returncode, cpu, peak = proc.returncode, usage.ru_utime + usage.ru_stime, polled_hwm * 1024
    if timed:
        lines = err_text.splitlines()
        at = max(i for i, line in enumerate(lines) if "Command being timed" in line)
        stats = dict(line.strip().split(": ", 1) for line in lines[at:] if ": " in line)
        returncode = int(stats["Exit status"])
        cpu = float(stats["User time (seconds)"]) + float(stats["System time (seconds)"])
        peak = int(stats["Maximum resident set size (kbytes)"]) * 1024
        err_text = "\n".join(lines[:at])
    return Measured(returncode, wall, cpu, peak, out_text, err_text, tmp_at, check_at)


@dataclass(frozen=True, slots=True)
class RestoreRow:
    """One restore's measurements."""

    point: Point
    plan: dict[str, Any]
    dry_run: Measured
    run: Measured
    correct: bool
    #: Seconds to download the plan's objects with the restore's schedule, and 8 at a time.
    raw_schedule: float
    raw_parallel: float

    @property
    def objects(self) -> int:
        return len(self.plan["objects"])

    @property
    def planning(self) -> float:
        return self.run.tmp_at or 0.0

    @property
    def applying(self) -> float:
        end = self.run.check_at or self.run.wall_seconds
        return end - self.planning

    @property
    def checking(self) -> float:
        return self.run.wall_seconds - (self.run.check_at or self.run.wall_seconds)


def rfc3339(ns: int) -> str:
    """`ns` (Unix) as an RFC 3339 UTC timestamp with milliseconds."""
    seconds, rest = divmod(ns, SECOND_NS)
    moment = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{moment}.{rest // 1_000_000:03d}Z"


def choose_points(timeline: Timeline, rng: random.Random) -> list[Point]:
    """The newest state, `POINTS` random TXIDs and `POINTS` random moments (distinct TXIDs)."""
    txids = rng.sample(range(2, timeline.last_txid), 2 * POINTS)
    points = [Point("latest", (), timeline.last_txid)]
    points += [Point(f"--txid {t}", ("--txid", str(t)), t) for t in sorted(txids[:POINTS])]
    for t in sorted(txids[POINTS:]):
        moment = rfc3339(timeline.commit_ns(t) + timeline.interval_ns // 2)
        points.append(Point(f"--timestamp {moment}", ("--timestamp", moment), t))
    return points


def replicad_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "replicad", *args]


def run_restore(
    point: Point, url: str, env: dict[str, str], out: Path, expected: tuple[str, int]
) -> tuple[dict[str, Any], Measured, Measured, bool]:
    """The plan (dry run) and the restore of `point`; whether the result is the model's."""
    dry = measure(replicad_cmd("restore", "-o", str(out), "--dry-run", *point.args, url), env)
    if dry.returncode != 0:
        raise BenchError(f"dry run of {point.label} failed:\n{dry.stderr[-3000:]}")
    plan = json.loads(dry.stdout)
    run = measure(replicad_cmd("restore", "-o", str(out), *point.args, url), env, out)
    if run.returncode != 0:
        raise BenchError(f"restore of {point.label} failed:\n{run.stderr[-3000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    digest, size = expected
    correct = (
        plan["target_txid"] == point.txid
        and result["txid"] == point.txid
        and result["objects"] == len(plan["objects"])
        and result["bytes"] == plan["bytes"]
        and out.stat().st_size == size
        and _sha256(out) == digest
    )
    out.unlink()
    return plan, dry, run, correct


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- 4. raw download -------------------------------------------------------------------------


def restore_schedule() -> tuple[int, int | None, int | None]:
    """How `replicad.restore` fetches segments: objects ahead, bytes ahead, streaming size."""
    return (
        restore_download.DEFAULT_PREFETCH,
        restore_download.PREFETCH_BYTES,
        restore_download.STREAM_ABOVE,
    )


async def raw_download(
    server: S3Server,
    bucket: str,
    objects: Sequence[tuple[str, int]],
    out: Path,
    *,
    like_restore: bool,
) -> float:
    """Fetch `objects` (key, size; the snapshot first) to files in `out`; seconds taken.

    The snapshot is streamed in 1 MiB reads, then the segments follow.  `like_restore`: in
    `replicad.restore`'s schedule (small objects fetched whole up to `DEFAULT_PREFETCH` and
    `PREFETCH_BYTES` ahead, objects above `STREAM_ABOVE` streamed when their turn comes, one
    at a time).  Otherwise all segments `RAW_PARALLEL` at a time, each read whole.
    """
    await asyncio.to_thread(out.mkdir)
    async with raw_client(server) as s3:

        async def stream(key: str, path: Path) -> None:
            response = await s3.get_object(Bucket=bucket, Key=f"{PREFIX}/{key}")
            with path.open("wb") as f:
                async with response["Body"] as body:
                    while chunk := await body.read(RAW_CHUNK):
                        f.write(chunk)

        async def whole(key: str) -> bytes:
            response = await s3.get_object(Bucket=bucket, Key=f"{PREFIX}/{key}")
            async with response["Body"] as body:
                data: bytes = await body.read()
            return data

        started = time.perf_counter()
        await stream(objects[0][0], out / "0")
        numbered = list(enumerate(objects[1:], start=1))
        if like_restore:
            ahead, budget, stream_above = restore_schedule()
            pending = deque(numbered)
            window: deque[tuple[int, str, int, asyncio.Task[bytes] | None]] = deque()
            in_flight = 0
            async with asyncio.TaskGroup() as tg:
                while pending or window:
                    while pending and len(window) < max(1, ahead):
                        number, (key, size) = pending[0]
                        if stream_above is not None and size > stream_above:
                            window.append((*pending.popleft()[:1], key, size, None))
                            break
                        if budget is not None and window and in_flight + size > budget:
                            break
                        pending.popleft()
                        window.append((number, key, size, tg.create_task(whole(key))))
                        in_flight += size
                    number, key, size, task = window.popleft()
                    if task is None:
                        await stream(key, out / str(number))
                    else:
                        (out / str(number)).write_bytes(await task)
                        in_flight -= size
        else:
            queue = iter(numbered)

            async def worker() -> None:
                for number, (key, _) in queue:
                    (out / str(number)).write_bytes(await whole(key))

            await asyncio.gather(*(worker() for _ in range(RAW_PARALLEL)))
        seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return seconds


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    size_mb: int
    hours: float
    rate: int
    batch_seconds: int
    seed: int


def _mb(n: float) -> float:
    return round(n / 1e6, 1)


def _isolate_environment(workdir: Path) -> None:
    """This process talks to the server too: no AWS, proxy or CA settings of this machine."""
    leaky = {
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    }
    for name in list(os.environ):
        if name.startswith("AWS_") or name.upper() in leaky:
            del os.environ[name]
    os.environ["AWS_CONFIG_FILE"] = str(workdir / "absent-aws-config")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(workdir / "absent-aws-credentials")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


def package_fingerprint() -> str:
    """SHA-256 over replicad/'s sources: the code under test must not change during a run."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "replicad").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def git_state() -> str:
    """HEAD, and whether replicad/ differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    dirty = git("status", "--porcelain", "replicad")
    dirty = " + uncommitted changes in replicad/" if dirty else ""
    return f"{git('rev-parse', '--short', 'HEAD') or 'unknown'}{dirty}"


async def run(settings: Settings, workdir: Path) -> None:
    """The whole benchmark in `workdir`."""
    total_started = time.perf_counter()
    fingerprint = package_fingerprint()
    rng = random.Random(settings.seed)
    content = Content(rng)
    per_segment = settings.rate * settings.batch_seconds
    transactions = round(settings.hours * 3600 * settings.rate)
    transactions -= transactions % per_segment
    now_s = int(time.time())
    t0_s = (now_s - round(settings.hours * 3600)) // 3600 * 3600
    timeline = Timeline(t0_s * SECOND_NS, SECOND_NS // settings.rate, transactions, per_segment)
    ahead, budget, stream_above = restore_schedule()
    print(f"machine: {machine()}")
    print(
        f"replicad: {git_state()}; restore fetches {ahead} objects ahead"
        + (f" within {budget >> 20} MiB" if budget else "")
        + (f", streams objects above {stream_above >> 20} MiB" if stream_above else "")
        + f"; compaction merges at most {DEFAULT_MAX_MERGE_BYTES >> 20} MiB of pages"
    )
    print(
        f"settings: {settings.size_mb} MB, {settings.hours:g} h at {settings.rate} txn/s = "
        f"{transactions:,} transactions, {settings.batch_seconds} s per level-0 segment "
        f"({timeline.segments:,} segments), seed {settings.seed}",
        flush=True,
    )

    # 1. the database and its snapshot
    db = workdir / "base.db"
    built = build_database(db, settings.size_mb * 10**6, content)
    leaves, ranges = blob_ranges(db)
    print(
        f"database: {built.rows:,} rows, {built.pages:,} pages ({_mb(built.pages * PAGE_SIZE)} "
        f"MB), {len(leaves):,} table leaf pages, built in {built.seconds:.1f} s",
        flush=True,
    )
    snap_path = workdir / "snapshot.tmp"
    started = time.perf_counter()
    with db.open("rb") as f:
        pages = iter(lambda: f.read(PAGE_SIZE), b"")
        hashes = PageHashes.build(PAGE_SIZE, enumerate(pages, start=1))
    snap_name, snap_size = write_snapshot(db, snap_path, 1, timeline.t0_ns, hashes.checksum)
    snap_encode = time.perf_counter() - started

    # 2. the history, on the model
    model_path = workdir / "model.db"
    shutil.copyfile(db, model_path)
    points = choose_points(timeline, rng)
    model = Model(model_path, leaves, ranges)
    try:
        history = generate_history(
            model,
            timeline,
            content,
            workdir / "segments.spool",
            {p.txid for p in points},
            hashes=hashes,
        )
    finally:
        model.close()
    model_path.unlink()
    db.unlink()
    l0_bytes = sum(s.size for s in history.segments)
    print(
        f"history: {history.pages_written:,} pages written ({_mb(history.raw_bytes)} MB raw, "
        f"{_mb(l0_bytes)} MB as {len(history.segments):,} segments), {history.grows} grows to "
        f"{history.final_pages:,} pages, in {history.seconds:.1f} s "
        f"({history.hash_seconds:.1f} s of it hashing the model)",
        flush=True,
    )

    server = start_rclone(workdir / "s3")
    cache = SpoolCache(workdir / "segments.spool", history.segments)
    try:
        bucket = unique_bucket()
        await create_bucket(server, bucket)
        kwargs = server.client_kwargs(bucket, PREFIX)
        objects: dict[ObjectName, int] = {snap_name: snap_size}
        async with (
            S3ReplicaClient(**kwargs) as client,
            S3ReplicaClient(**kwargs, concurrency=UPLOAD_CONCURRENCY) as bulk,
        ):
            started = time.perf_counter()
            await client.put_file(snap_name.key, snap_path)
            snap_upload = time.perf_counter() - started
            snap_path.unlink()
            print(
                f"snapshot: {_mb(snap_size)} MB, encoded in {snap_encode:.1f} s, "
                f"uploaded in {snap_upload:.1f} s",
                flush=True,
            )
            upload = await upload_segments(bulk, cache, history.segments)
            objects.update((s.name, s.size) for s in history.segments)
            for name, path, size in history.snapshots:
                await client.put_file(name.key, path)
                path.unlink()
                objects[name] = size
            print(
                f"growth snapshots: {len(history.snapshots)}, "
                f"{_mb(sum(size for _, _, size in history.snapshots))} MB",
                flush=True,
            )
            print(
                f"upload: {len(history.segments):,} segments in {upload.seconds:.1f} s "
                f"({len(history.segments) / upload.seconds:.0f}/s, {UPLOAD_CONCURRENCY} in "
                f"flight; {upload.first_rate:.0f}/s over the first tenth, "
                f"{upload.last_rate:.0f}/s over the last)",
                flush=True,
            )
            compaction = await compact_all(client, objects, cache, timeline.end_ns // 1_000_000)
            print(
                f"compaction: {sum(compaction.jobs.values()):,} jobs in {compaction.rounds} "
                f"rounds, {compaction.seconds:.1f} s ({compaction.plan_seconds:.1f} s "
                "planning)",
                flush=True,
            )
            started = time.perf_counter()
            listed = {parse_key(i.key) for i in await client.list_objects()}
            list_seconds = time.perf_counter() - started
            if listed != set(objects):
                raise BenchError("the replica's listing differs from the objects written")
        cache.close()
        (workdir / "segments.spool").unlink()
        build_seconds = time.perf_counter() - total_started

        # 3. and 4. restores and raw downloads
        url = s3_url(server, bucket, PREFIX)
        env = s3_env(server, workdir)
        rows: list[RestoreRow] = []
        for point in points:
            out = workdir / "restored.db"
            plan, dry, measured, correct = run_restore(
                point, url, env, out, history.expected[point.txid]
            )
            keys = [(o["key"], o["bytes"]) for o in plan["objects"]]
            schedule = await raw_download(server, bucket, keys, workdir / "raw", like_restore=True)
            parallel = await raw_download(server, bucket, keys, workdir / "raw", like_restore=False)
            rows.append(RestoreRow(point, plan, dry, measured, correct, schedule, parallel))
            print(
                f"restore {point.label}: {measured.wall_seconds:.1f} s, "
                f"{'correct' if correct else 'WRONG'}",
                flush=True,
            )
    finally:
        server.stop()
    if package_fingerprint() != fingerprint:
        raise BenchError("replicad/ changed during the run; its numbers would mix versions: rerun")
    report(
        settings=settings,
        timeline=timeline,
        built=built,
        history=history,
        objects=objects,
        compaction=compaction,
        upload=upload,
        snap_upload=snap_upload,
        list_seconds=list_seconds,
        build_seconds=build_seconds,
        rows=rows,
        total_seconds=time.perf_counter() - total_started,
    )
    if not all(r.correct for r in rows):
        raise BenchError("a restore did not reproduce the model")


def _label(name: ObjectName) -> str:
    return "snapshot" if name.kind is ObjectKind.SNAPSHOT else f"L{name.level}"


def report(
    *,
    settings: Settings,
    timeline: Timeline,
    built: Built,
    history: History,
    objects: dict[ObjectName, int],
    compaction: Compaction,
    upload: Upload,
    snap_upload: float,
    list_seconds: float,
    build_seconds: float,
    rows: list[RestoreRow],
    total_seconds: float,
) -> None:
    print("\nReplica after compaction:")
    levels: dict[str, list[int]] = {}
    for name, size in sorted(objects.items()):
        levels.setdefault(_label(name), []).append(size)
    table: list[tuple[object, ...]] = [
        (label, len(sizes), _mb(sum(sizes)), _mb(sum(sizes) / len(sizes)), _mb(max(sizes)))
        for label, sizes in levels.items()
    ]
    table.append(("total", len(objects), _mb(sum(objects.values())), "", ""))
    print_table(["level", "objects", "MB", "mean MB", "max MB"], table)
    jobs = ", ".join(f"L{level}: {n:,}" for level, n in sorted(compaction.jobs.items()))
    print(
        f"\nBuilding the replica took {build_seconds:.0f} s: database {built.seconds:.0f} s, "
        f"history {history.seconds:.0f} s, snapshot upload {snap_upload:.0f} s, "
        f"segment upload {upload.seconds:.0f} s, compaction {compaction.seconds:.0f} s "
        f"(jobs {jobs}); listing all {len(objects):,} objects took {list_seconds:.1f} s."
    )
    print(
        "\nRestores (replicad restore as a child process, wall time split by watching OUT.tmp;"
        " raw = the plan's objects downloaded in the restore's schedule, and 8 at a time):"
    )
    headers = [
        "target",
        "TXID",
        "objects",
        "MB",
        "dry run s",
        "restore s",
        "plan s",
        "apply s",
        "check s",
        "CPU s",
        "peak RSS MB",
        "raw s",
        "raw 8x s",
        "apply/raw",
        "correct",
    ]
    table = []
    for r in rows:
        table.append(
            (
                r.point.label,
                r.point.txid,
                r.objects,
                _mb(r.plan["bytes"]),
                round(r.dry_run.wall_seconds, 1),
                round(r.run.wall_seconds, 1),
                round(r.planning, 1),
                round(r.applying, 1),
                round(r.checking, 1),
                round(r.run.cpu_seconds, 1),
                _mb(r.run.peak_rss_bytes),
                round(r.raw_schedule, 1),
                round(r.raw_parallel, 1),
                round(r.applying / r.raw_schedule, 1),
                "yes" if r.correct else "NO",
            )
        )
    print_table(headers, table)
    print("\nObjects per restore by level:")
    by_level = []
    for r in rows:
        counts: dict[str, int] = {}
        for o in r.plan["objects"]:
            parsed = parse_key(o["key"])
            assert parsed is not None
            counts[_label(parsed)] = counts.get(_label(parsed), 0) + 1
        kinds = ("snapshot", "L3", "L2", "L1", "L0")
        by_level.append((r.point.label, *(counts.get(k, 0) for k in kinds)))
    print_table(["target", "snapshot", "L3", "L2", "L1", "L0"], by_level)
    print(
        f"\nTotal run time {total_seconds:.0f} s.  Settings: {settings}.  "
        f"History {timeline.transactions:,} transactions from "
        f"{rfc3339(timeline.t0_ns)} to {rfc3339(timeline.end_ns)}."
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pitr",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_SIZE_MB} MB, {QUICK_HOURS:g} h, "
        f"{QUICK_BATCH_SECONDS} s segments, unless given",
    )
    parser.add_argument("--size-mb", type=int, help=f"database size (default {DEFAULT_SIZE_MB})")
    parser.add_argument("--hours", type=float, help=f"history (default {DEFAULT_HOURS:g})")
    parser.add_argument("--rate", type=int, default=DEFAULT_RATE, help="transactions per second")
    parser.add_argument(
        "--batch-seconds",
        type=int,
        help=f"seconds per level-0 segment (default {DEFAULT_BATCH_SECONDS})",
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    settings = Settings(
        size_mb=args.size_mb or (QUICK_SIZE_MB if args.quick else DEFAULT_SIZE_MB),
        hours=args.hours or (QUICK_HOURS if args.quick else DEFAULT_HOURS),
        rate=args.rate,
        batch_seconds=args.batch_seconds
        or (QUICK_BATCH_SECONDS if args.quick else DEFAULT_BATCH_SECONDS),
        seed=args.seed,
    )
    if settings.rate < 1 or settings.batch_seconds < 1 or 30 % settings.batch_seconds:
        parser.error("--rate must be >= 1 and --batch-seconds divide 30")
    workdir = Path(tempfile.mkdtemp(prefix="replicad-pitr-"))
    _isolate_environment(workdir)
    try:
        asyncio.run(run(settings, workdir))
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
