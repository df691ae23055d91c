"""Replication of one database to its replicas: start-up, the sync step, snapshots, flushing.

`DatabaseReplicator` joins a `Database` (blocking SQLite and WAL reads, run in a worker thread
under one lock) to its `Replica`s (async uploads).  Its loops (`sync_loop`, `upload_loop`) are
thin wrappers around one-shot steps (`sync_step`, `snapshot_step`, `Replica.upload`) that tests
call directly.  The daemon starts the loops in its TaskGroup and calls `flush` at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from replicad.checkpoint import Checkpointer, CheckpointPolicy, CheckpointResult
from replicad.checksum import PageHashes, format_checksum
from replicad.db import CapturedTxn, Database, SnapshotSource, SyncResult
from replicad.drill import Drill
from replicad.errors import ReplicadError, ReplicaError, SnapshotRetry
from replicad.format import ObjectHeader, ObjectWriter, object_name
from replicad.lease import LeaseError, LeaseLostError
from replicad.pidfile import database_replaced
from replicad.position import ObjectKind
from replicad.replica import Replica, ReplicaTip, SnapshotFile, spool_path
from replicad.retention import RETENTION_CHECK_INTERVAL
from replicad.spool import PageSpool

#: Seconds between syncs when no file-change event arrives (the source of truth if one is missed).
DEFAULT_POLL_INTERVAL = 1.0
#: Minimum seconds between uploads to one replica: PUTs are batched to this interval, and the
#: first commit after an idle period ships at once.
DEFAULT_SYNC_INTERVAL = 1.0
#: Seconds between scheduled snapshots (0: only when needed). A restore reads the newest
#: snapshot and every segment after it, so this bounds restore time as well as storage.
DEFAULT_SNAPSHOT_INTERVAL = 24 * 3600.0
#: A snapshot is also taken once the pages captured since the last one (taken by this process)
#: add up to this many times that snapshot's size: the segments after a snapshot never
#: outgrow it, so restoring the newest state reads at most about twice the database (less
#: after compaction), and snapshots add at most one byte uploaded per byte captured.
SNAPSHOT_GROWTH = 1.0
#: ... but not before this many bytes were captured: a small database restores fast anyway,
#: and would otherwise be snapshotted every few transactions.
SNAPSHOT_GROWTH_MIN_BYTES = 64 << 20
#: How often each replica looks for settled segments to compact.
COMPACTION_CHECK_INTERVAL = 30.0
#: Longest wait between retries of a failing sync step.
DEFAULT_RETRY_MAX = 30.0
#: Longest wait between upload retries: about one attempt a second while the store is down
#: (what a healthy replica costs anyway), so the lag ends soon after the store is back.
_UPLOAD_RETRY_MAX = 2.0
_RETRY_MIN = 0.2
#: Quick extra syncs after a checkpoint wrote the database file (see `sync_loop`): how many,
#: how far apart.
_FOLLOW_UPS = 4
_FOLLOW_UP_SECONDS = 0.025
#: While a file watcher wakes the sync loop, its poll ticks only look whether the files changed
#: (a stat, no thread, no SQLite); a full sync still runs at least this often, in case a change
#: left the size and modification time as they were (coarse timestamps, a same-size rewrite).
_FULL_SYNC_BACKSTOP = 15.0
#: After a checkpoint wrote the database file, poll ticks sync in full for this long: another
#: process's RESTART or TRUNCATE may be waiting for our read mark, and the moment it can move
#: (the WAL marked copied in the -shm) changes no file's size or time.  An application's busy
#: timeout is typically 5 s.
_FULL_SYNCS_AFTER_CHECKPOINT = 5.0
#: Longest pause between checkpoints that copy nothing new (a reader pins the WAL).
_STUCK_BACKOFF_MAX = 2.0
#: Most WAL frames replicad copies while it holds the application's writers off.
_MAX_HELD_FRAMES = 256
#: How often the read mark moves while a checkpoint waits for it.
_LEAPFROG_DURING_CHECKPOINT = 0.005
#: How often the maintenance task looks whether compaction or retention is due.
_MAINTENANCE_TICK = 5.0
_SNAPSHOT_ATTEMPTS = 5
#: The page hashes of the state every replica held at the last clean stop (state directory).
HASHES_NAME = "pagehashes"


@dataclass(slots=True)
class ReplicatorStats:
    """Counters for the metrics layer."""

    syncs: int = 0
    sync_errors: int = 0
    transactions: int = 0
    #: Page bytes captured from committed WAL frames (the WAL volume replicated).
    captured_bytes: int = 0
    snapshots: int = 0
    continuity_losses: int = 0
    wal_size: int = 0
    #: Largest -wal file size seen: a workload outgrowing one SQLite file shows here first.
    wal_high_water: int = 0
    last_sync_duration: float = 0.0
    #: Checkpoints run by replicad, by mode; those SQLite reported busy; time spent in them.
    checkpoints: dict[str, int] = field(default_factory=dict)
    checkpoints_busy: int = 0
    checkpoint_seconds: float = 0.0
    checkpoint_errors: int = 0


class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    def __init__(self, *, minimum: float = _RETRY_MIN, maximum: float = DEFAULT_RETRY_MAX) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.failures = 0

    def next_delay(self) -> float:
        """Delay before the next attempt; grows with each consecutive failure."""
        self.failures += 1
        cap = min(self.maximum, self.minimum * 2 ** min(self.failures, 16))
        return random.uniform(self.minimum, cap)

    def reset(self) -> None:
        """A success: start again from the minimum."""
        self.failures = 0


class DatabaseReplicator:
    """Replicates one `Database` to its `Replica`s."""

    def __init__(
        self,
        db: Database,
        replicas: list[Replica],
        *,
        name: str,
        state_dir: Path,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        sync_interval: float = DEFAULT_SYNC_INTERVAL,
        checkpoints: CheckpointPolicy | None = None,
        snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.db = db
        self.replicas = replicas
        self.name = name
        self.state_dir = state_dir
        self.poll_interval = poll_interval
        self.sync_interval = sync_interval
        self.log = log or structlog.get_logger().bind(db=name)
        self.stats = ReplicatorStats()
        #: Set while the daemon waits for another process's lock on this database (for /readyz).
        self.standby: str | None = None
        self.wake = asyncio.Event()
        #: True while a file watcher reports changes (`file_changed`): poll ticks are a backstop.
        self.watched = False
        self._checkpoint_seen = False
        self._full_syncs_until = 0.0
        #: The files' stat signature when the last sync began (None: sync at the next tick).
        self._signature: tuple[object, ...] | None = None
        self._lock = asyncio.Lock()
        self._lost: str | None = None
        self.policy = checkpoints or CheckpointPolicy()
        self.checkpointer = Checkpointer(db.path, timeout=self.policy.checkpoint_timeout)
        self._last_checkpoint = time.monotonic()
        self._checkpoint_failed = False
        self._no_waiting_until = 0.0
        #: WAL generation (salts) and how many of its frames the last complete checkpoint copied.
        self._copied: tuple[tuple[int, int] | None, int] = (None, 0)
        #: Last checkpoint's (generation, frames copied), to notice when copying is stuck.
        self._progress: tuple[tuple[int, int] | None, int] = (None, -1)
        self._checkpoint_not_before = 0.0
        self._stuck = Backoff(minimum=0.1, maximum=_STUCK_BACKOFF_MAX)
        #: Replica name -> why it could not be loaded yet, for the shutdown report.
        self._load_failures: dict[str, str] = {}
        self.snapshot_interval = snapshot_interval
        self.last_sync_monotonic = 0.0
        self._snapshot_requested = False
        self._last_snapshot_ms = 0
        #: Restore drills of its replicas (drill.py), run by the daemon; empty when off.
        self.drills: list[Drill] = []
        #: Bytes captured by the last snapshot taken here, and `stats.captured_bytes` then.
        self._snapshot_bytes = 0
        self._captured_at_snapshot = 0

    # -- start-up ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, learn where each replica stands, then resume or snapshot.

        Raises `DatabaseError` if the database cannot be replicated.  A replica that cannot be
        reached is logged and retried by its upload loop; the others go ahead.
        """
        tips = await self._load_tips()  # first: a standby waits there without opening the db
        await asyncio.to_thread(self.db.open)
        replaced = await asyncio.to_thread(database_replaced, self.state_dir, self.db.path)
        async with self._lock:
            self._lost = await asyncio.to_thread(self._resume, tips)
            if self._lost is not None and replaced:
                # Another file: a new base, rather than a diff against one it never continued.
                self._lost = "the database file was replaced while replicad was not running"
            elif self._lost is not None:
                changes = await asyncio.to_thread(self._ship_changes, tips, self._lost)
                self._lost = None if changes is None else f"{self._lost}; {changes}"
        if self._lost is not None:
            self.log.info("taking a snapshot", reason=self._lost)
        self._last_snapshot_ms = max(
            (
                n.max_time_ms
                for r in self.replicas
                for n in r.objects
                if n.kind is ObjectKind.SNAPSHOT
            ),
            default=0,
        )
        await self.snapshot_step()

    async def _load_tips(self) -> dict[str, ReplicaTip | None]:
        results = await asyncio.gather(
            *(r.load_tip() for r in self.replicas), return_exceptions=True
        )
        tips: dict[str, ReplicaTip | None] = {}
        for replica, result in zip(self.replicas, results, strict=True):
            if isinstance(result, LeaseError):
                raise result  # another daemon writes this replica: refuse to start, loudly
            if isinstance(result, ReplicadError):
                self._load_failed(replica, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                tips[replica.name] = result
        return tips

    def _resume(self, tips: dict[str, ReplicaTip | None]) -> str | None:
        """Resume from the most advanced replica whose position the WAL still holds (blocking).

        Returns None when resumed, else why a snapshot is needed.
        """
        ranked = sorted(
            ((name, tip) for name, tip in tips.items() if tip is not None),
            key=lambda item: item[1].txid,
            reverse=True,
        )
        reason = "the replica is empty" if not ranked else "no replica has a WAL position"
        for name, tip in ranked:
            if tip.position is None:
                continue
            if tip.page_size != self.db.page_size:
                reason = (
                    f"replica {name} has page size {tip.page_size}, database {self.db.page_size}"
                )
                continue
            reason_or_none = self.db.resume(
                tip.position, txid=0, db_pages=tip.db_pages, checksum=tip.checksum
            )
            if reason_or_none is None:
                self._align(tips, tip)
                self.log.info("resumed from replica", replica=name, txid=tip.txid)
                return None
            reason = reason_or_none
        return reason

    def _ship_changes(self, tips: dict[str, ReplicaTip | None], why: str) -> str | None:
        """Instead of a snapshot, queue one transaction of the pages that changed since the
        replicas' newest state, if the page hashes saved at the last stop prove that state
        (blocking).  Returns None when queued, else why not.

        The proof: the saved table's checksum equals every replica's newest `post` checksum,
        so the table describes exactly the state the next object applies to.
        """
        saved = PageHashes.load(self._hashes_path, spill_dir=self.state_dir)
        if saved is None:
            return "no page hashes were saved at the last stop"
        loaded = [r for r in self.replicas if r.loaded]
        if not loaded or any(
            (tip := tips.get(r.name)) is None
            or tip.checksum != saved.checksum
            or tip.page_size != self.db.page_size
            for r in loaded
        ):
            return "the saved page hashes are not those of every replica's newest state"
        source = self.db.start_fresh(base_txid=self.db.state.txid)
        current = self.db.page_hashes(source)
        changed = current.diff(saved)
        if 2 * len(changed) > max(1, source.db_pages):
            return f"{len(changed)} of {source.db_pages} pages changed: a snapshot is smaller"
        self.db.adopt_hashes(current)
        if current.checksum == saved.checksum:
            for replica in loaded:  # nothing changed: the replicas hold this very state
                replica.align(source.txid, self.db.page_size)
            self.log.info("resumed from replica", reason="unchanged since the last stop")
            return None
        pages = self._changed_pages(source, changed)
        txn = CapturedTxn(
            source.txid,
            source.time_ns,
            source.db_pages,
            pages,
            source.position,
            saved.checksum,
            current.checksum,
        )
        for replica in loaded:
            replica.align(source.txid - 1, self.db.page_size)
            replica.enqueue([txn])
        self.log.info(
            "restarted without a snapshot: shipping the pages that changed while replicad was "
            "not running",
            reason=why,
            pages=len(changed),
            db_pages=source.db_pages,
        )
        return None

    def _changed_pages(
        self, source: SnapshotSource, changed: list[int]
    ) -> list[tuple[int, bytes]] | PageSpool:
        """The changed pages, in memory or (past the spill size) in a spool file."""
        if len(changed) * self.db.page_size <= self.db.spill_bytes:
            return self.db.read_pages(source, changed)
        spool = PageSpool(self.db.spill_dir, self.db.page_size)
        try:
            for pgno, data in self.db.read_pages(source, changed):
                spool.put(pgno, data)
        except BaseException:
            spool.close()
            raise
        return spool

    @property
    def _hashes_path(self) -> Path:
        return self.state_dir / HASHES_NAME

    def save_hashes(self) -> None:
        """Save the page hashes of the captured state for the next start (blocking); call it
        when every replica holds that state (at a clean stop), so a restart ships only what
        changes meanwhile.
        """
        hashes = self.db.state.hashes
        if hashes is None:
            return
        try:
            hashes.save(self._hashes_path)
        except ReplicadError as exc:
            self.log.warning(
                "cannot save page hashes; the next start takes a snapshot", error=str(exc)
            )

    def _align(self, tips: dict[str, ReplicaTip | None], resumed: ReplicaTip) -> None:
        for replica in self.replicas:
            tip = tips.get(replica.name)
            if tip is not None and tip.position == resumed.position:
                replica.align(0, self.db.page_size)
            elif replica.loaded:
                replica.require_snapshot("behind the newest replica")

    # -- steps ------------------------------------------------------------------------------

    async def sync_step(self) -> SyncResult | None:
        """Capture new commits, queue them on every replica, snapshot if continuity was lost."""
        if self._lost is None:
            async with self._lock:
                result = await self._sync_once()
        else:
            result = None
        if self._lost is not None or any(r.wants_snapshot for r in self.replicas):
            await self.snapshot_step()
        elif self._snapshot_due():
            await self._due_snapshot()
        return result

    async def _due_snapshot(self) -> None:
        """A requested or scheduled snapshot, unless one is still waiting to be uploaded to
        every replica: a request then joins it (the pending snapshot and the segments after it
        restore any later point just as well).
        """
        requested = self._snapshot_requested
        pending = [r.snapshot for r in self.replicas if r.loaded]
        if requested and pending and all(s is not None for s in pending):
            self._snapshot_requested = False
            txids = sorted({s.name.last_txid for s in pending if s is not None})
            self.log.info("snapshot requested; joining the one waiting to upload", txid=txids[-1])
            return
        self.log.info("taking a requested snapshot" if requested else "taking a scheduled snapshot")
        await self.snapshot_step(everyone=True)

    def request_snapshot(self) -> None:
        """Take a snapshot for every replica at the next sync (SIGUSR1, `replicad snapshot`)."""
        self._snapshot_requested = True
        self.wake.set()

    def _snapshot_due(self) -> bool:
        if self._snapshot_requested:
            return True
        grown = self.stats.captured_bytes - self._captured_at_snapshot
        if self._snapshot_bytes and grown >= max(
            SNAPSHOT_GROWTH * self._snapshot_bytes, SNAPSHOT_GROWTH_MIN_BYTES
        ):
            return True
        if self.snapshot_interval <= 0:
            return False
        return time.time() * 1000 - self._last_snapshot_ms >= self.snapshot_interval * 1000

    async def _sync_once(self) -> SyncResult:
        started = time.perf_counter()
        self._signature = self._disk_signature()  # before reading: a later change differs
        try:
            result = await asyncio.to_thread(self.db.sync)
        except ReplicadError:
            self._signature = None
            self.stats.sync_errors += 1
            raise
        self.stats.syncs += 1
        self.stats.last_sync_duration = time.perf_counter() - started
        self.last_sync_monotonic = time.monotonic()
        self.stats.wal_size = result.wal_size
        self.stats.wal_high_water = max(self.stats.wal_high_water, result.wal_size)
        self._distribute(result)
        return result

    def _distribute(self, result: SyncResult) -> None:
        if result.transactions:
            self.stats.transactions += len(result.transactions)
            self.stats.captured_bytes += sum(t.nbytes for t in result.transactions)
            for replica in self.replicas:
                replica.enqueue(result.transactions)
        if result.lost_continuity is not None:
            self.stats.continuity_losses += 1
            self._lost = result.lost_continuity
            self.log.warning("continuity lost; taking a new snapshot", reason=self._lost)

    async def snapshot_step(self, *, everyone: bool = False) -> None:
        """Snapshot for every replica that needs one, or for all of them (`everyone`, and after
        a lost continuity).
        """
        async with self._lock:
            for attempt in range(1, _SNAPSHOT_ATTEMPTS + 1):
                try:
                    await self._snapshot_once(everyone)
                except SnapshotRetry as exc:
                    self.log.info(
                        "snapshot raced a WAL restart; retrying", attempt=attempt, reason=str(exc)
                    )
                    continue
                return
            raise SnapshotRetry(f"snapshot did not succeed in {_SNAPSHOT_ATTEMPTS} attempts")

    async def _snapshot_once(self, everyone: bool) -> None:
        if self._lost is None:
            await self._catch_up()  # a continuity loss found on the way sets self._lost
        fresh = self._lost is not None
        targets = [r for r in self.replicas if r.loaded and (fresh or everyone or r.wants_snapshot)]
        if not targets:
            return
        if fresh and self.db.is_replaced():
            await asyncio.to_thread(self.db.reopen)
        if fresh:
            source = await asyncio.to_thread(self.db.start_fresh, base_txid=self.db.state.txid)
        else:
            source = self.db.current_source()
        files = await asyncio.to_thread(self._write_snapshots, source, targets)
        for replica, snapshot in files:
            replica.offer_snapshot(snapshot)
        for snapshot in {id(f): f for _, f in files}.values():
            snapshot.users -= 1  # the creator's reference
            if snapshot.users <= 0:
                snapshot.release()
        self._lost = None
        self._snapshot_requested = False
        self._last_snapshot_ms = source.time_ns // 1_000_000
        self._snapshot_bytes = source.db_pages * source.page_size
        self._captured_at_snapshot = self.stats.captured_bytes
        self.stats.snapshots += 1
        # The TXID the replicas will hold it as (what "snapshot uploaded" and `ls` say).
        txids = sorted({f.name.last_txid for _, f in files})
        txid: object = txids[0] if len(txids) == 1 else txids
        self.log.info("snapshot taken", txid=txid, pages=source.db_pages)
        return

    async def _catch_up(self) -> None:
        """Sync until the whole WAL is captured (the lock is held by the caller)."""
        while (await self._sync_once()).more and self._lost is None:
            pass

    def _write_snapshots(
        self, source: SnapshotSource, targets: list[Replica]
    ) -> list[tuple[Replica, SnapshotFile]]:
        """Encode one snapshot file per distinct TXID the targets need (blocking)."""
        by_txid: dict[int, SnapshotFile] = {}
        out = []
        for replica in targets:
            txid = replica.snapshot_txid(source.txid)
            if txid not in by_txid:
                by_txid[txid] = self._write_snapshot(source, txid)
                by_txid[txid].users += 1
            out.append((replica, by_txid[txid]))
        return out

    def _write_snapshot(self, source: SnapshotSource, txid: int) -> SnapshotFile:
        """Encode the snapshot, hashing every page on the way: the page hashes it yields are
        the state's (a fresh start adopts them; otherwise they check the ones kept current).
        """
        header = ObjectHeader(
            kind=ObjectKind.SNAPSHOT,
            page_size=source.page_size,
            level=0,
            first_txid=txid,
            last_txid=txid,
            min_time_ns=source.time_ns,
            max_time_ns=source.time_ns,
            db_pages=source.db_pages,
            # No WAL generation yet (empty WAL): nothing to resume from after a restart.
            position=source.position if source.position.salt1 >= 0 else None,
            pre_checksum=0,
            post_checksum=0,  # patched below, once every page has been hashed
        )
        path = spool_path(self.state_dir, txid)
        try:
            with path.open("r+b") as sink:
                writer = ObjectWriter(sink, header)
                writer.begin_transaction(
                    txid, source.time_ns, source.db_pages, source.db_pages, checksum=0
                )
                hashes = PageHashes(source.page_size, spill_dir=self.state_dir)
                for pgno, data in self.db.iter_snapshot_pages(source):
                    writer.add_page(pgno, data)
                    hashes.set_page(pgno, data)
                hashes.set_size(source.db_pages)
                head = writer.settle_checksum(hashes.checksum)
                size = writer.finish()
                sink.seek(0)
                sink.write(head)
                header = dataclasses.replace(header, post_checksum=hashes.checksum)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self._check_hashes(hashes)
        return SnapshotFile(object_name(header), source.txid, path, size)

    def _check_hashes(self, hashes: PageHashes) -> None:
        """Adopt the snapshot's page hashes; if some were kept current, they must agree."""
        kept = self.db.state.hashes
        if kept is not None and kept.checksum != hashes.checksum:
            # Something changed the database outside its WAL, or a bug: the objects since the
            # last snapshot carry checksums a restore will refuse; from here on they are right.
            self.log.error(
                "database checksum drifted from the pages replicad captured; the snapshot "
                "starts a verified chain again",
                kept=format_checksum(kept.checksum),
                actual=format_checksum(hashes.checksum),
            )
        self.db.adopt_hashes(hashes)

    async def checkpoint_step(self) -> CheckpointResult | None:
        """Checkpoint if the policy says so; None if none was due (see checkpoint.py)."""
        now = time.monotonic()
        mode = self.policy.mode_for(
            self._uncopied_frames(),
            now - self._last_checkpoint,
            may_wait=now >= self._no_waiting_until,
        )
        if mode is None or self._checkpoint_failed or self._lost is not None:
            return None
        if now < self._checkpoint_not_before:
            return None
        try:
            if mode == "PASSIVE":
                result = await self._passive_checkpoint()
            else:
                result = await self._waiting_checkpoint(mode)
        except ReplicadError as exc:
            self._checkpoint_failed = True
            self.stats.checkpoint_errors += 1
            self.log.error("checkpoint failed; replicad will not checkpoint", error=str(exc))
            return None
        finally:
            self._last_checkpoint = time.monotonic()
        self._record_checkpoint(result)
        return result

    def _pace(self, generation: tuple[int, int] | None, result: CheckpointResult) -> None:
        """Back off while checkpoints copy nothing new (an application reader pins the WAL, or
        another checkpointer is busy): each attempt takes SQLite's checkpoint lock, and another
        process's checkpoint that meets it fails at once.
        """
        done = self._progress
        self._progress = (generation, result.checkpointed_frames)
        if result.busy:
            return  # a collision with another checkpointer: try again at the next sync
        if done[0] == generation and result.checkpointed_frames <= done[1]:
            self._checkpoint_not_before = time.monotonic() + self._stuck.next_delay()
        else:
            self._stuck.reset()

    def _uncopied_frames(self) -> int:
        """Frames of the current WAL generation that no complete checkpoint has copied yet."""
        frames = self.db.generation_frames()
        generation, copied = self._copied
        if generation == self.db.generation():
            frames -= copied
        return max(0, frames)

    async def _copy_bulk(self) -> tuple[CheckpointResult, bool]:
        """A lock-free PASSIVE copy; whether little enough is left to finish with the
        application's writers held off.

        Not when another checkpoint is running (let it finish; we keep leapfrogging), nor when
        more than `_MAX_HELD_FRAMES` remain: a copy ends with an fsync and disks stall, and after
        a huge transaction it takes seconds, far beyond an application's busy timeout.
        """
        bulk = await asyncio.to_thread(self.checkpointer.run, "PASSIVE")
        left = bulk.log_frames - bulk.checkpointed_frames
        return bulk, not bulk.busy and left <= _MAX_HELD_FRAMES

    async def _passive_checkpoint(self) -> CheckpointResult:
        """Copy the bulk lock-free, then finish with writers held off for a moment."""
        bulk, finish = await self._copy_bulk()
        if not finish:
            return bulk
        if not await asyncio.to_thread(self.checkpointer.hold_writers):
            return dataclasses.replace(bulk, busy=True)
        try:
            await self._leapfrog()  # capture the last frames; the new read mark is the end
            rest = await asyncio.to_thread(self.checkpointer.run, "PASSIVE")
            await self._leapfrog()  # begins on a fully copied WAL: read mark 0
        finally:
            await asyncio.to_thread(self.checkpointer.release_writers)
        return dataclasses.replace(rest, seconds=bulk.seconds + rest.seconds)

    async def _waiting_checkpoint(self, mode: str) -> CheckpointResult:
        """RESTART/TRUNCATE wait for every reader; keep moving ours until the wait is over.

        They hold the application's writers off while they copy, so the bulk is copied
        lock-free first (`_copy_bulk`); only when little is left does the waiting mode run.
        """
        bulk, finish = await self._copy_bulk()
        if not finish:
            return bulk
        job = asyncio.get_running_loop().run_in_executor(None, self.checkpointer.run, mode)
        try:
            while not job.done():
                await self._leapfrog()
                await asyncio.wait([job], timeout=_LEAPFROG_DURING_CHECKPOINT)
        finally:
            await asyncio.wait([job])
        result = job.result()
        await self._leapfrog()
        return dataclasses.replace(result, seconds=bulk.seconds + result.seconds)

    async def _leapfrog(self) -> None:
        """One sync, for its read-mark move; a lost continuity is handled by the next sync_step."""
        if self._lost is None:
            async with self._lock:
                await self._sync_once()

    def _record_checkpoint(self, result: CheckpointResult) -> None:
        generation = self.db.generation()
        if not result.busy and result.checkpointed_frames == result.log_frames:
            self._copied = (generation, result.checkpointed_frames)
        self._pace(generation, result)
        stats = self.stats
        stats.checkpoints[result.mode] = stats.checkpoints.get(result.mode, 0) + 1
        stats.checkpoints_busy += result.busy
        if result.busy and result.mode != "PASSIVE":
            # A reader held it off for the whole timeout (and the app's writers with it):
            # copy what PASSIVE can until the interval has passed, then try again.
            self._no_waiting_until = time.monotonic() + self.policy.checkpoint_interval
            self.log.warning(
                "checkpoint could not finish: a long read transaction holds the WAL",
                mode=result.mode,
                waited=round(result.seconds, 3),
                retry_in=self.policy.checkpoint_interval,
            )
        stats.checkpoint_seconds += result.seconds
        self.log.debug(
            "checkpoint",
            mode=result.mode,
            busy=result.busy,
            frames=result.log_frames,
            copied=result.checkpointed_frames,
            seconds=round(result.seconds, 4),
        )

    # -- loops ------------------------------------------------------------------------------

    def file_changed(self, path: Path) -> None:
        """The file watcher saw `path` (the database or its WAL) change: sync now."""
        if path.name == self.db.path.name:
            # In WAL mode only a checkpoint writes the database file.
            self._checkpoint_seen = True
            self._full_syncs_until = time.monotonic() + _FULL_SYNCS_AFTER_CHECKPOINT
        self.wake.set()

    def _disk_signature(self) -> tuple[object, ...]:
        """Size, modification time and inode of the database and its WAL (a stat each)."""
        out: list[object] = []
        for path in (self.db.path, self.db.wal_path):
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
            else:
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _nothing_to_do(self) -> bool:
        """At a watched poll tick: nothing changed on disk and nothing else is owed."""
        return (
            self.watched
            and self._lost is None
            and self._signature is not None
            and time.monotonic() - self.last_sync_monotonic < _FULL_SYNC_BACKSTOP
            and time.monotonic() >= self._full_syncs_until
            and not self._snapshot_due()
            and not any(r.wants_snapshot for r in self.replicas)
            and self._disk_signature() == self._signature
        )

    async def sync_loop(self, stop: asyncio.Event) -> None:
        """Sync on every wake-up (file change) or poll tick until `stop` is set.

        With a file watcher, an idle database costs a stat per poll tick and nothing else.
        """
        backoff = Backoff()
        follow_ups = 0
        while not stop.is_set():
            woken = await _wait(
                self.wake, seconds=_FOLLOW_UP_SECONDS if follow_ups else self.poll_interval
            )
            self.wake.clear()
            if stop.is_set():
                return
            # A checkpoint marks the WAL copied in the -shm after writing the database, which
            # makes no file event: look again shortly so nobody waits a poll tick for our read
            # mark to move.  (Unwatched, any wake-up may be one.)
            checkpoint = self._checkpoint_seen or (woken and not self.watched)
            self._checkpoint_seen = False
            following = follow_ups > 0
            follow_ups = _FOLLOW_UPS if checkpoint else max(0, follow_ups - 1)
            try:
                if not woken and not following and self._nothing_to_do():
                    await self.checkpoint_step()  # an interval checkpoint may still be due
                    continue
                await self.sync_step()
                await self.checkpoint_step()
                backoff.reset()
            except ReplicadError as exc:
                self.log.error("sync failed; will retry", error=str(exc))
                await _sleep_unless(stop, backoff.next_delay())

    async def upload_loop(self, replica: Replica, stop: asyncio.Event) -> None:
        """Upload what `replica` has queued, at most once per sync interval, until `stop`."""
        backoff = Backoff(maximum=_UPLOAD_RETRY_MAX)
        while not stop.is_set() and replica.fenced is None:
            if not replica.loaded:
                await self._load_late(replica, backoff, stop)
            elif not replica.has_work:
                await _wait(replica.wake, seconds=None)
                replica.wake.clear()
            else:
                wait = replica.last_upload_monotonic + self.sync_interval - time.monotonic()
                if wait > 0 and await _sleep_unless(stop, wait):
                    return
                await self._upload_once(replica, backoff, stop)

    async def maintenance_loop(self, replica: Replica, stop: asyncio.Event) -> None:
        """Compaction and retention for `replica`, in a task of their own so that a long merge
        never holds up an upload; work in progress is cancelled when `stop` is set.
        """
        while not stop.is_set() and replica.fenced is None:
            if await _sleep_unless(stop, self._until_maintenance(replica)):
                return
            if replica.loaded and replica.offset is not None:
                await _unless_stopped(stop, self._maintain(replica))

    @staticmethod
    def _until_maintenance(replica: Replica) -> float:
        """Seconds until compaction or retention is next due (idle: no wake-ups before)."""
        if not replica.loaded or replica.offset is None:
            return _MAINTENANCE_TICK
        now = time.monotonic()
        due = min(
            replica.last_compaction_monotonic + COMPACTION_CHECK_INTERVAL,
            replica.last_retention_monotonic + RETENTION_CHECK_INTERVAL,
        )
        return max(_MAINTENANCE_TICK, due - now + 0.01)

    async def _upload_once(self, replica: Replica, backoff: Backoff, stop: asyncio.Event) -> bool:
        """One upload step; False if it failed (after the backoff) or the replica was taken."""
        try:
            await replica.upload()
        except LeaseLostError:
            return False  # the replica's writer logged it; the loop ends (replica.fenced)
        except ReplicadError as exc:
            replica.log.error("upload failed; will retry", error=str(exc))
            await _sleep_unless(stop, backoff.next_delay())
            return False
        backoff.reset()
        return True

    async def _maintain(self, replica: Replica) -> None:
        """Compaction and retention, each when its interval has passed."""
        now = time.monotonic()
        try:
            if now - replica.last_compaction_monotonic > COMPACTION_CHECK_INTERVAL:
                await replica.compact()
            if now - replica.last_retention_monotonic > RETENTION_CHECK_INTERVAL:
                await replica.enforce_retention()
        except ReplicadError as exc:
            replica.log.error("compaction or retention failed; will retry", error=str(exc))

    async def _load_late(self, replica: Replica, backoff: Backoff, stop: asyncio.Event) -> None:
        try:
            await replica.load_tip()
        except ReplicadError as exc:
            self._load_failed(replica, exc)
            await _sleep_unless(stop, backoff.next_delay())
            return
        self._load_failures.pop(replica.name, None)
        backoff.reset()
        replica.require_snapshot("the replica was unreachable at start-up")
        self.wake.set()

    def _load_failed(self, replica: Replica, exc: ReplicadError) -> None:
        """Log why a replica could not be loaded (a failed write says so: a read-only mount is
        not a read error) and keep it for the shutdown report.
        """
        what = "write" if isinstance(exc, ReplicaError) and exc.failed_write else "read"
        replica.log.error(f"cannot {what} replica; will retry", error=str(exc))
        self._load_failures[replica.name] = f"cannot {what} it: {exc}"

    # -- shutdown ---------------------------------------------------------------------------

    async def flush(self, deadline: float, *, final_sync: bool = True) -> list[str]:
        """Capture everything committed and upload it, retrying until `deadline` (monotonic).

        Returns what could not be shipped, one line per replica; empty means all of it was.
        `final_sync=False`: upload only what was captured (the file is gone: directory mode).
        """
        try:
            if final_sync:
                await self.sync_step()
        except ReplicadError as exc:
            return [f"{self.name}: final sync failed: {exc}"]
        results = await asyncio.gather(*(self._flush_replica(r, deadline) for r in self.replicas))
        problems = [problem for problem in results if problem]
        if not problems and self._lost is None:
            async with self._lock:
                await asyncio.to_thread(self.save_hashes)
        return problems

    async def _flush_replica(self, replica: Replica, deadline: float) -> str | None:
        backoff = Backoff(maximum=2.0)
        while replica.has_work and replica.fenced is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(replica.upload(), timeout=remaining)
            except (ReplicadError, TimeoutError) as exc:
                replica.log.warning("flush attempt failed", error=str(exc) or "timed out")
                await asyncio.sleep(
                    min(backoff.next_delay(), max(0.0, deadline - time.monotonic()))
                )
        if not replica.loaded:
            why = self._load_failures.get(replica.name, "it was never reached")
            return (
                f"{self.name} -> {replica.name}: waited for the replica until shutdown ({why}); "
                "nothing committed since the last run was uploaded to it"
            )
        if replica.has_work:
            what = f"{len(replica.pending)} transactions" + (
                " and a snapshot" if replica.snapshot is not None else ""
            )
            return f"{self.name} -> {replica.name}: {what} not uploaded"
        return None

    def interrupt(self) -> None:
        """Wake every loop so it notices that stop was requested."""
        self.wake.set()
        for replica in self.replicas:
            replica.wake.set()
            if replica.lease is not None:
                replica.lease.stop_waiting()

    def close(self) -> None:
        """Release the database (blocking): the checkpoint connection first, so it is never the
        last one to close, then the read holders, then the raw descriptor.
        """
        self.checkpointer.close()
        self.db.close()


async def _wait(event: asyncio.Event, *, seconds: float | None) -> bool:
    """Wait until `event` is set (True) or `seconds` pass (False)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


async def _unless_stopped(stop: asyncio.Event, work: Coroutine[Any, Any, None]) -> None:
    """Run `work`, cancelling it if `stop` is set first."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _sleep_unless(stop: asyncio.Event, delay: float) -> bool:
    """Sleep `delay` seconds; returns True early if `stop` is set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay)
    except TimeoutError:
        return False
    return True
