"""One destination of one database: what it holds, what it still needs, and how to send it.

A `Replica` owns a `ReplicaClient` and a queue of captured transactions.  It lists its storage
once, at start-up, to learn where it stands; afterwards it knows what it wrote, so steady state
costs no LIST requests and an idle database costs no requests at all.  Uploads are one-shot
steps (`upload_snapshot`, `upload_pending`) wrapped by the caller's loop, which retries them.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from replicad.clients.base import ReplicaClient
from replicad.compaction import DEFAULT_LEVELS, DEFAULT_SETTLE_MS, compact, plan_compaction
from replicad.db import CapturedTxn
from replicad.errors import (
    FormatError,
    ObjectLockedError,
    ObjectNotFoundError,
    ReplicaError,
    RestoreError,
)
from replicad.fence import FencedWriter
from replicad.format import (
    HEADER_SIZE,
    ObjectHeader,
    ObjectWriter,
    SupportsWrite,
    decode_header,
    object_name,
)
from replicad.lease import Lease, LeaseLostError, is_lease_key
from replicad.position import ObjectKind, ObjectName, WalPosition, parse_key
from replicad.private import create_private, make_private_dir, unpredictable_name
from replicad.restore import plan_restore
from replicad.retention import DEFAULT_RETENTION, DEFAULT_RETENTION_GRACE, plan_retention
from replicad.tip import TIP_KEY, TIP_KEYS, encode_tip

#: Raw page bytes per segment object; a backlog is split into objects of about this size.
DEFAULT_SEGMENT_MAX_BYTES = 32 << 20
#: Bytes of recently uploaded segments kept for compaction (level 1 is built from them).
RECENT_CACHE_BYTES = 32 << 20
#: A replica further behind than this drops its backlog and catches up with a snapshot,
#: so a long outage cannot exhaust the daemon's memory.
DEFAULT_MAX_PENDING_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class ReplicaTip:
    """The newest state a replica holds: its last TXID and, if known, the WAL position after it."""

    txid: int
    position: WalPosition | None
    db_pages: int
    page_size: int
    #: The database checksum after `txid` (None for a v1 object, which records none).
    checksum: int | None = None


@dataclass(slots=True)
class SnapshotFile:
    """A snapshot encoded into a local file, uploaded to each replica that was offered it."""

    name: ObjectName
    #: The daemon's capture counter at the snapshot (replica TXIDs are this plus an offset).
    db_txid: int
    path: Path
    size: int
    users: int = 0

    def release(self) -> None:
        """One replica is done with the file; delete it when none is left."""
        self.users -= 1
        if self.users <= 0:
            self.path.unlink(missing_ok=True)


class Replica:
    """Ships one database's transactions and snapshots to one `ReplicaClient`."""

    def __init__(
        self,
        name: str,
        client: ReplicaClient,
        *,
        segment_max_bytes: int = DEFAULT_SEGMENT_MAX_BYTES,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        retention: float = DEFAULT_RETENTION,
        retention_grace: float = DEFAULT_RETENTION_GRACE,
        compaction_levels: Sequence[float] = DEFAULT_LEVELS,
        compaction_settle_ms: int = DEFAULT_SETTLE_MS,
        spool_dir: Path | None = None,
        follow_tip: bool = True,
        lease: Lease | None = None,
        takeover: bool = False,
        standby: bool = False,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.name = name
        self.client = client
        self.segment_max_bytes = segment_max_bytes
        self.max_pending_bytes = max_pending_bytes
        self.retention = retention
        self.retention_grace = retention_grace
        self.compaction_levels = tuple(compaction_levels)
        self.compaction_settle_ms = compaction_settle_ms
        #: Where segments holding spooled transactions are encoded before upload.
        self.spool_dir = spool_dir or Path(tempfile.gettempdir())
        #: Fencing (see lease.py); None when the storage cannot enforce create-only writes.
        self.lease = lease
        self.takeover = takeover
        #: Wait while another daemon holds the lease (False: refuse to start).
        self.standby = standby
        self.last_compaction_monotonic = time.monotonic()
        #: Segments uploaded lately, so building level 1 needs no download.
        self._recent: OrderedDict[ObjectName, bytes] = OrderedDict()
        self._recent_bytes = 0
        self.last_retention_monotonic = time.monotonic()
        self.log = log or structlog.get_logger().bind(replica=name)
        #: Every write and delete goes through this (fence.py).
        self.writer = FencedWriter(client, lease, log=self.log)
        #: Last TXID this replica holds (0: nothing yet).
        self.shipped_txid = 0
        #: Replica TXID = daemon capture counter + offset; None until the chain is aligned
        #: (at start-up, or by a snapshot).  TXIDs are per replica, so a replica that was
        #: behind or unreachable continues its own numbering without gaps or collisions.
        self.offset: int | None = None
        #: Why this replica needs a snapshot before it can continue, if it does.
        self.needs_snapshot: str | None = "no state loaded yet"
        self.loaded = False
        self.snapshot: SnapshotFile | None = None
        self.pending: deque[CapturedTxn] = deque()
        self.pending_bytes = 0
        #: Last TXID of a segment whose upload failed.  The retry sends exactly that segment:
        #: the failed PUT may have landed, and a second segment starting at the same TXID but
        #: ending elsewhere would leave restores inside it a dead end (found by the crash soak).
        self._retry_upto: int | None = None
        self.page_size = 0
        self.last_upload_monotonic = 0.0
        self.last_upload_time = 0.0
        self.wake = asyncio.Event()
        #: Every object this replica holds, with its size: listed once at start-up, then kept
        #: up to date by uploads and deletions, so retention and inspection need no LIST.
        self.objects: dict[ObjectName, int] = {}
        self._created = time.monotonic()
        self._snapshot_offered = 0.0
        #: Keys of the newest objects uploaded, for the tip that followers read (tip.py).
        self._tip_keys: deque[str] = deque(maxlen=TIP_KEYS)
        self.follow_tip = follow_tip

    @property
    def fenced(self) -> str | None:
        """Why this replica is not written again (another daemon took it over), or None."""
        return self.writer.lost

    # -- start-up ---------------------------------------------------------------------------

    async def load_tip(self) -> ReplicaTip | None:
        """List the replica once and read the header of its newest object.

        Returns None for an empty replica.  Objects that are not ours are ignored with a warning.
        """
        objects = await self.client.list_objects()
        if self.lease is not None:
            leases = [info.key for info in objects if is_lease_key(info.key)]
            if await self.lease.acquire(takeover=self.takeover, standby=self.standby, keys=leases):
                objects = await self.client.list_objects()  # the holder wrote on meanwhile
        names = []
        foreign = 0
        self.objects.clear()
        for info in objects:
            name = parse_key(info.key)
            if name is None:
                foreign += not is_lease_key(info.key) and info.key != TIP_KEY
            else:
                names.append(name)
                self.objects[name] = info.size
        if foreign:
            self.log.warning(
                "ignoring objects that are not replicad's", count=foreign, url=self.client.url
            )
        if not names:
            self.shipped_txid = 0
            self.loaded = True
            return None
        newest = max(names, key=lambda n: (n.last_txid, n.kind is ObjectKind.SEGMENT))
        try:
            header = await self._read_header(newest)
        except ObjectLockedError:
            # Encrypted, and this host holds no private key (by design): the WAL position is
            # unknown, so the replicator snapshots and TXIDs continue after the newest name.
            self.shipped_txid = newest.last_txid
            self.loaded = True
            return ReplicaTip(newest.last_txid, None, 0, 0)
        self.shipped_txid = newest.last_txid
        self.page_size = header.page_size
        self.loaded = True
        position = header.position
        if problem := _unverified_tip(self.objects, newest):
            # Continuing it would extend a history a restore may not choose: a snapshot numbered
            # above everything starts a chain no stale object can be taken for.
            self.log.warning("not continuing the replica's newest object", reason=problem)
            position = None
        return ReplicaTip(
            newest.last_txid, position, header.db_pages, header.page_size, header.post_checksum
        )

    async def _read_header(self, name: ObjectName) -> ObjectHeader:
        head = b""
        async for chunk in self.client.iter_object(name.key, chunk_size=HEADER_SIZE):
            head += chunk
            if len(head) >= HEADER_SIZE:
                break
        header = decode_header(head[:HEADER_SIZE])
        if header.kind is not name.kind or header.last_txid != name.last_txid:
            raise FormatError(
                f"object {name.key} in {self.client.url} does not match its name",
                hint="something other than replicad wrote under this prefix; use a fresh prefix",
            )
        return header

    def align(self, db_txid: int, page_size: int) -> None:
        """The daemon resumed at this replica's tip: its capture counter `db_txid` is our tip."""
        self.offset = self.shipped_txid - db_txid
        self.page_size = page_size
        self.needs_snapshot = None

    def snapshot_txid(self, db_txid: int) -> int:
        """The TXID this replica gives a snapshot taken at capture counter `db_txid`."""
        if self.offset is not None:
            return db_txid + self.offset
        return self.shipped_txid + 1 + (self.lease.txid_gap if self.lease is not None else 0)

    # -- queue ------------------------------------------------------------------------------

    def enqueue(self, txns: list[CapturedTxn]) -> None:
        """Queue captured transactions; past the memory bound, fall back to a snapshot."""
        if not txns or (self.offset is None and self.snapshot is None):
            return  # unaligned: a coming snapshot covers these
        if self.fenced is not None:
            return  # another daemon owns this replica: nothing is written to it again
        for txn in txns:
            self.pending.append(txn)
            self.pending_bytes += txn.nbytes
        # The oldest transaction is the one being shipped, not "a backlog": a healthy replica
        # ships even a huge one while the commits after it queue up.
        if self.pending_bytes - self.pending[0].nbytes > self.max_pending_bytes:
            self.log.warning(
                "replica fell too far behind; dropping its backlog for a new snapshot",
                pending_bytes=self.pending_bytes,
                limit=self.max_pending_bytes,
            )
            self.require_snapshot("backlog exceeded max_pending_bytes")
        self.wake.set()

    def require_snapshot(self, reason: str) -> None:
        """This replica's chain cannot continue: drop its queue and wait for a snapshot."""
        if self.snapshot is not None:
            self.snapshot.release()
            self.snapshot = None
        self.pending.clear()
        self.pending_bytes = 0
        self._retry_upto = None
        self.offset = None
        self.needs_snapshot = reason

    def offer_snapshot(self, snapshot: SnapshotFile) -> None:
        """Give this replica a snapshot to upload after the transactions that precede it."""
        if self.snapshot is not None:
            self.snapshot.release()
        snapshot.users += 1
        self.snapshot = snapshot
        self._snapshot_offered = time.monotonic()
        self.page_size = snapshot_page_size(snapshot)
        self.wake.set()

    @property
    def wants_snapshot(self) -> bool:
        """True when this replica needs a snapshot and none has been offered yet."""
        return (
            self.loaded
            and self.needs_snapshot is not None
            and self.snapshot is None
            and self.fenced is None
        )

    @property
    def has_work(self) -> bool:
        """True while something is waiting to be uploaded."""
        return bool(self.pending) or self.snapshot is not None

    def unshipped_seconds(self) -> float:
        """How long something committed has been waiting to reach this replica (0 if nothing):
        the oldest queued commit, an offered snapshot, or a replica not reachable since start.
        """
        now = time.monotonic()
        if self.pending:
            return self.lag_seconds()
        if self.snapshot is not None:
            return now - self._snapshot_offered
        if not self.loaded:
            return now - self._created
        return 0.0

    def lag_seconds(self, now_ns: int | None = None) -> float:
        """Age of the oldest transaction not yet uploaded (0 when caught up)."""
        if not self.pending:
            return 0.0
        now_ns = now_ns or time.time_ns()
        return max(0.0, (now_ns - self.pending[0].commit_time_ns) / 1e9)

    # -- upload step ------------------------------------------------------------------------

    async def upload(self) -> int:
        """Upload what is queued now, in TXID order. Returns the number of objects written.

        Transactions older than an offered snapshot go first (they are history the snapshot
        does not replace), then the snapshot, then the rest.  Commits captured while this runs
        wait for the next call, so one interval costs one object rather than a trailing tiny
        one.  A failure raises and leaves the queue as it was, so the caller just calls again.
        """
        upto = self.pending[-1].txid if self.pending else 0
        written = 0
        while True:
            limit = upto if self.snapshot is None else min(upto, self.snapshot.db_txid)
            if self.pending and self.offset is not None and self.pending[0].txid <= limit:
                await self._upload_segment(limit)
            elif self.snapshot is not None:
                await self._upload_snapshot(self.snapshot)
            else:
                if written and self.follow_tip:
                    await self._put_tip()
                return written
            written += 1

    async def _put_tip(self) -> None:
        """Name the newest objects in the tip, once per upload step (tip.py: followers find
        new objects without LIST).  Advice only: a failure is logged, not raised (a lost lease
        is, as for every write).
        """
        try:
            await self.writer.replace_pointer(TIP_KEY, encode_tip(self._tip_keys))
        except LeaseLostError:
            raise
        except ReplicaError as exc:
            self.log.warning("cannot update the tip for followers", error=str(exc))

    async def _upload_segment(self, limit: int) -> None:
        assert self.offset is not None
        batch = self._next_batch(limit)
        self._retry_upto = batch[-1].txid
        if any(t.spooled for t in batch):
            name, size = await self._upload_from_file(batch, self.offset)
        else:
            name, data = await asyncio.to_thread(
                _encode_segment, batch, self.page_size, self.offset
            )
            await self.writer.put_object(name.key, data)
            size = len(data)
            if self.compaction_levels:
                self._remember(name, data)
        self.objects[name] = size
        self._tip_keys.append(name.key)
        self.shipped_txid = name.last_txid
        self._retry_upto = None
        if self.offset is None:
            self._uploaded()  # the queue was dropped meanwhile; a snapshot follows
            return
        for _ in batch:
            self.pending_bytes -= self.pending.popleft().nbytes
        self._uploaded()

    async def _upload_from_file(
        self, batch: list[CapturedTxn], offset: int
    ) -> tuple[ObjectName, int]:
        """Encode a batch holding spooled transactions into a local file and upload that, so a
        huge transaction costs bounded memory (multipart parts), not its size.
        """
        name, header = _segment_header(batch, self.page_size, offset)
        path = self.spool_dir / unpredictable_name(f"segment-{name.last_txid:016x}")
        try:
            size = await asyncio.to_thread(_encode_segment_file, path, header, batch, offset)
            await self.writer.put_file(name.key, path)
        finally:
            path.unlink(missing_ok=True)
        return name, size

    async def _upload_snapshot(self, snapshot: SnapshotFile) -> None:
        await self.writer.put_file(snapshot.name.key, snapshot.path)
        self.objects[snapshot.name] = snapshot.size
        self._tip_keys.append(snapshot.name.key)
        self.snapshot = None
        snapshot.release()
        self.offset = snapshot.name.last_txid - snapshot.db_txid
        if self.lease is not None:
            self.lease.txid_gap = 0
        self.shipped_txid = snapshot.name.last_txid
        self.needs_snapshot = None
        while self.pending and self.pending[0].txid <= snapshot.db_txid:
            self.pending_bytes -= self.pending.popleft().nbytes
        self._uploaded()
        self.log.info("snapshot uploaded", txid=snapshot.name.last_txid, bytes=snapshot.size)

    async def enforce_retention(self, *, dry_run: bool = False) -> list[ObjectName]:
        """Delete what the retention window no longer needs; returns what was (or would be)."""
        doomed = plan_retention(
            self.objects,
            now_ms=int(time.time() * 1000),
            retention=self.retention,
            grace=self.retention_grace,
        )
        self.last_retention_monotonic = time.monotonic()
        if doomed and not dry_run:
            await self.writer.delete_objects([n.key for n in doomed])
            for name in doomed:
                self.objects.pop(name, None)
            self.log.info("retention deleted objects", count=len(doomed), upto=doomed[-1].last_txid)
        return doomed

    async def compact(self) -> int:
        """Merge settled segments into coarser levels (see compaction.py). Returns objects made.

        A source deleted by retention meanwhile just skips its job; nothing is ever deleted here.
        """
        self.last_compaction_monotonic = time.monotonic()
        if not self.compaction_levels:
            return 0
        jobs = await asyncio.to_thread(
            plan_compaction,
            list(self.objects),
            levels=self.compaction_levels,
            now_ms=int(time.time() * 1000),
            settle_ms=self.compaction_settle_ms,
        )
        made = 0
        for job in jobs:
            if any(source not in self.objects for source in job.sources):
                continue
            try:
                outputs = await compact(
                    self.client,
                    job,
                    writer=self.writer,
                    cache=self._recent,
                    spool_dir=self.spool_dir,
                )
            except ObjectNotFoundError:
                continue
            for name, size in outputs:
                self.objects[name] = size
            made += len(outputs)
            for source in job.sources:  # merged: not needed again (higher levels use outputs)
                if (data := self._recent.pop(source, None)) is not None:
                    self._recent_bytes -= len(data)
        if made:
            self.log.debug("compacted", objects=made, jobs=len(jobs))
        return made

    def _remember(self, name: ObjectName, data: bytes) -> None:
        self._recent[name] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > RECENT_CACHE_BYTES and self._recent:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= len(old)

    def _next_batch(self, limit: int) -> list[CapturedTxn]:
        if self._retry_upto is not None:
            limit = min(limit, self._retry_upto)  # the same segment as the failed try
        batch: list[CapturedTxn] = []
        size = 0
        for txn in self.pending:
            if txn.txid > limit:
                break
            if batch and size + txn.nbytes > self.segment_max_bytes:
                break
            batch.append(txn)
            size += txn.nbytes
        return batch

    def _uploaded(self) -> None:
        self.last_upload_monotonic = time.monotonic()
        self.last_upload_time = time.time()


def _unverified_tip(objects: dict[ObjectName, int], newest: ObjectName) -> str | None:
    """Why the newest object is not the end of the history a restore of the newest state
    proves, or None when it is.
    """
    try:
        plan = plan_restore(objects)
    except RestoreError as exc:
        return f"the replica's history does not verify: {exc.message}"
    last = plan.objects[-1]
    if (last.last_txid, last.post) != (newest.last_txid, newest.post):
        return f"{newest.key} is not on the replica's verified history"
    return None


def snapshot_page_size(snapshot: SnapshotFile) -> int:
    """Page size recorded in a spooled snapshot's header."""
    with snapshot.path.open("rb") as f:
        return decode_header(f.read(HEADER_SIZE)).page_size


def _encode_segment(
    batch: list[CapturedTxn], page_size: int, offset: int
) -> tuple[ObjectName, bytes]:
    """A level-0 segment in memory: its name and bytes."""
    name, header = _segment_header(batch, page_size, offset)
    sink = io.BytesIO()
    _write_segment(sink, header, batch, offset)
    return name, sink.getvalue()


def _encode_segment_file(
    path: Path, header: ObjectHeader, batch: list[CapturedTxn], offset: int
) -> int:
    """A level-0 segment written to `path` (created); its size."""
    make_private_dir(path.parent)
    with create_private(path) as sink:
        return _write_segment(sink, header, batch, offset)


def _write_segment(
    sink: SupportsWrite, header: ObjectHeader, batch: list[CapturedTxn], offset: int
) -> int:
    """Stream the batch's transactions into `sink` as one object; its size."""
    writer = ObjectWriter(sink, header)
    for t in batch:
        writer.begin_transaction(
            t.txid + offset, t.commit_time_ns, t.db_pages, len(t.pages), checksum=t.post
        )
        for pgno, data in t.pages:
            writer.add_page(pgno, data)
    return writer.finish()


def _segment_header(
    batch: list[CapturedTxn], page_size: int, offset: int
) -> tuple[ObjectName, ObjectHeader]:
    """The name and header of the level-0 segment holding `batch` (replica TXIDs)."""
    first, last = batch[0], batch[-1]
    header = ObjectHeader(
        kind=ObjectKind.SEGMENT,
        page_size=page_size,
        level=0,
        first_txid=first.txid + offset,
        last_txid=last.txid + offset,
        min_time_ns=first.commit_time_ns,
        max_time_ns=last.commit_time_ns,
        db_pages=last.db_pages,
        # No WAL generation yet (a restart's changed pages over an empty WAL): none to resume.
        position=last.end if last.end.salt1 >= 0 else None,
        pre_checksum=first.pre,
        post_checksum=last.post,
    )
    return object_name(header), header


def spool_path(state_dir: Path, txid: int) -> Path:
    """A new, empty file (owner-only) in the database's state directory, where a snapshot of
    `txid` is encoded before upload.

    Created exclusively under an unpredictable name: two snapshots at the same TXID (requested
    back to back with no write between) must never share a file, or releasing the first would
    delete the second's, and nobody can plant a file or link there in advance.
    """
    make_private_dir(state_dir)
    path = state_dir / unpredictable_name(f"snapshot-{txid:016x}")
    create_private(path).close()
    return path
