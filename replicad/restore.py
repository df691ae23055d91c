"""Restore: plan which objects rebuild the database at a TXID (pure), then apply them (I/O).

Plan: the newest snapshot at or before the target, then the chain of segments that starts
right after it and reaches the target.  A gap in that chain is an error naming the last TXID
that can be restored, never a silently older database.

Apply: stream each object through the verifying decoder and write its pages at their offsets in
``OUT.tmp`` (newest wins, because objects are applied in TXID order), stop at the target
transaction, truncate to the target's database size, fsync, run ``PRAGMA integrity_check``,
remove stale ``OUT-wal``/``OUT-shm`` and move the file into place, then fsync the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from replicad.clients.base import ObjectInfo, ReplicaClient
from replicad.errors import FormatError, RestoreError
from replicad.format import (
    HEADER_SIZE,
    EndEvent,
    ObjectDecoder,
    PageEvent,
    TxnEndEvent,
    TxnInfo,
    decode_header,
    read_trailer,
)
from replicad.position import ObjectKind, ObjectName, parse_key

#: Objects downloaded ahead of the one being applied.
DEFAULT_PREFETCH = 8
#: Bytes downloaded ahead at most; objects above `STREAM_ABOVE` are streamed, not held whole.
PREFETCH_BYTES = 64 << 20
STREAM_ABOVE = 16 << 20
#: Bytes handed to the decoder at a time (its events for one chunk are held at once).
_FEED_BYTES = 1 << 20
INTEGRITY_MODES = ("full", "quick", "none")
#: Most consecutive pages written with one system call.
_WRITE_RUN_PAGES = 256

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class RestorePlan:
    """The objects that rebuild the database as of `target_txid`, in the order to apply them."""

    snapshot: ObjectName
    segments: tuple[ObjectName, ...]
    target_txid: int
    sizes: tuple[int, ...]

    @property
    def objects(self) -> tuple[ObjectName, ...]:
        """Snapshot first, then segments."""
        return (self.snapshot, *self.segments)

    @property
    def total_bytes(self) -> int:
        """Bytes to download."""
        return sum(self.sizes)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What a restore produced."""

    path: Path
    txid: int
    page_size: int
    db_pages: int
    objects: int
    bytes_downloaded: int
    seconds: float


def names_from_listing(objects: Iterable[ObjectInfo]) -> dict[ObjectName, int]:
    """Our objects in a listing, with their sizes; foreign keys are left out."""
    out = {}
    for info in objects:
        name = parse_key(info.key)
        if name is not None:
            out[name] = info.size
    return out


def plan_restore(names: dict[ObjectName, int], *, target_txid: int | None = None) -> RestorePlan:
    """Choose the objects that restore `target_txid` (default: the newest TXID). Pure.

    Raises `RestoreError` when the replica is empty, the target is out of range, or the chain
    of segments after the chosen snapshot has a gap before the target.
    """
    if not names:
        raise RestoreError(
            "the replica holds no replicad objects",
            hint="check the replica URL and prefix; a replica gets its first snapshot when "
            "`replicad replicate` starts",
        )
    newest = max(n.last_txid for n in names)
    target = newest if target_txid is None else target_txid
    if target > newest:
        raise RestoreError(f"TXID {target} is newer than the replica's newest ({newest})")
    snapshot = _snapshot_for(names, target)
    segments = _chain(names, snapshot.last_txid, target)
    chosen = (snapshot, *segments)
    return RestorePlan(snapshot, tuple(segments), target, tuple(names[n] for n in chosen))


def _snapshot_for(names: Iterable[ObjectName], target: int) -> ObjectName:
    snapshots = [n for n in names if n.kind is ObjectKind.SNAPSHOT and n.last_txid <= target]
    if not snapshots:
        raise RestoreError(
            f"no snapshot at or before TXID {target}",
            hint="the history before the oldest snapshot is no longer kept",
        )
    return max(snapshots, key=lambda n: n.last_txid)


def _chain(names: Iterable[ObjectName], after: int, target: int) -> list[ObjectName]:
    """Segments from `after + 1` up to `target`: at each step the one reaching furthest
    without passing the target, else the one that contains it (applied partly)."""
    starts: dict[int, list[ObjectName]] = {}
    for name in names:
        if name.kind is ObjectKind.SEGMENT:
            starts.setdefault(name.first_txid, []).append(name)
    chain = []
    reached = after
    while reached < target:
        candidates = starts.get(reached + 1)
        if not candidates:
            raise RestoreError(
                f"the history has a gap: no segment starts at TXID {reached + 1}",
                hint=f"the newest state before the gap is TXID {reached}: "
                f"restore it with --txid {reached}",
            )
        within = [n for n in candidates if n.last_txid <= target]
        step = (
            max(within, key=lambda n: n.last_txid)
            if within
            else min(candidates, key=lambda n: (n.level, n.last_txid))
        )
        if step.last_txid > target and step.level > 0:
            # A compacted segment carries its pages on its last transaction only: applying it
            # partly would be wrong. Level-0 segments are what make single TXIDs restorable.
            raise RestoreError(
                f"TXID {target} is inside compacted segment {step.key} and the level-0 "
                "segments for it are gone",
                hint=f"restore TXID {reached} or {step.last_txid} instead",
            )
        chain.append(step)
        reached = step.last_txid
    return chain


def parse_timestamp(text: str) -> int:
    """An RFC 3339 timestamp (any time zone) as Unix nanoseconds; RestoreError if malformed."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise RestoreError(
            f"cannot read timestamp {text!r}", hint="use RFC 3339, e.g. 2026-11-24T01:30:00Z"
        ) from exc
    if moment.tzinfo is None:
        raise RestoreError(
            f"timestamp {text!r} has no time zone",
            hint="add Z for UTC or an offset such as +01:00, so the moment is unambiguous",
        )
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


async def txid_at(client: ReplicaClient, names: dict[ObjectName, int], at_ns: int) -> int:
    """The last TXID committed at or before `at_ns`, exactly (commit times as replicad saw them).

    Key names narrow the search to one segment; its trailer gives each transaction's time.
    """
    at_ms = at_ns // 1_000_000
    best = max(
        (n.last_txid for n in names if n.kind is ObjectKind.SNAPSHOT and n.max_time_ms < at_ms),
        default=0,
    )
    segments = sorted(
        (n for n in names if n.kind is ObjectKind.SEGMENT and n.level == 0),
        key=lambda n: n.first_txid,
    )
    for name in segments:
        if name.max_time_ms < at_ms:
            best = max(best, name.last_txid)
        elif name.min_time_ms <= at_ms:
            for info in _trailer(await client.get_object(name.key), name):
                if info.commit_time_ns <= at_ns:
                    best = max(best, info.txid)
    if best == 0:
        raise RestoreError(
            "no transaction in the replica was committed at or before that time",
            hint="the oldest restorable moment is the oldest snapshot's; see `replicad ls`",
        )
    return best


def _trailer(data: bytes, name: ObjectName) -> list[TxnInfo]:
    header = decode_header(data[:HEADER_SIZE])
    if header.kind is not name.kind or header.last_txid != name.last_txid:
        raise FormatError(f"object {name.key} does not match its name")
    return read_trailer(data)


async def restore(
    client: ReplicaClient,
    output: Path,
    *,
    target_txid: int | None = None,
    at_ns: int | None = None,
    force: bool = False,
    integrity: str = "full",
    prefetch: int = DEFAULT_PREFETCH,
) -> RestoreResult:
    """Restore the replica's database as of `target_txid` (default: newest) to `output`.

    Raises `RestoreError` for a target that exists (without `force`), an empty replica, a gap,
    a failed integrity check; `FormatError` for a corrupt object; `ReplicaError` for storage.
    """
    started = time.monotonic()
    output, tmp = await asyncio.to_thread(_prepare_target, output, force)
    plan = await make_plan(client, target_txid=target_txid, at_ns=at_ns)
    try:
        page_size, db_pages = await _apply(client, plan, tmp, prefetch)
        await asyncio.to_thread(_check_integrity, tmp, integrity)
        await asyncio.to_thread(_move_into_place, tmp, output, force)
    except BaseException:
        _remove_quietly(tmp, _sidecar(tmp, "-wal"), _sidecar(tmp, "-shm"))
        raise
    return RestoreResult(
        output,
        plan.target_txid,
        page_size,
        db_pages,
        len(plan.objects),
        plan.total_bytes,
        time.monotonic() - started,
    )


async def make_plan(
    client: ReplicaClient, *, target_txid: int | None = None, at_ns: int | None = None
) -> RestorePlan:
    """List the replica and plan a restore to a TXID, a moment (`at_ns`), or the newest state."""
    names = names_from_listing(await client.list_objects())
    if at_ns is not None and names:
        target_txid = await txid_at(client, names, at_ns)
    return plan_restore(names, target_txid=target_txid)


def _prepare_target(output: Path, force: bool) -> tuple[Path, Path]:
    """Refuse an existing target unless forced; clear leftovers of an interrupted restore."""
    output = output.absolute()
    if output.exists() and not force:
        raise RestoreError(
            f"{output} already exists",
            hint="restore to a new path, or pass --force to replace it (stop the application "
            "first)",
        )
    if not output.parent.is_dir():
        raise RestoreError(f"directory {output.parent} does not exist")
    tmp = output.with_name(output.name + ".tmp")
    _remove_quietly(tmp, _sidecar(tmp, "-wal"), _sidecar(tmp, "-shm"))
    return output, tmp


async def _apply(
    client: ReplicaClient, plan: RestorePlan, tmp: Path, prefetch: int
) -> tuple[int, int]:
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise RestoreError(f"cannot create {tmp}: {exc.strerror}") from exc
    writer = _PageWriter(fd)
    try:
        await _apply_snapshot(client, plan, writer)
        await _apply_segments(client, plan, writer, prefetch)
        await asyncio.to_thread(writer.finish)
    except OSError as exc:
        raise RestoreError(
            f"cannot write {tmp}: {exc.strerror}",
            hint="free space on that filesystem (the result needs about the database's size), "
            "or restore to another directory",
        ) from exc
    finally:
        os.close(fd)
    return writer.page_size, writer.db_pages


async def _apply_snapshot(client: ReplicaClient, plan: RestorePlan, writer: _PageWriter) -> None:
    decoder = ObjectDecoder(expected=plan.snapshot)
    with _naming(client, plan.snapshot):
        async for chunk in _iter(client, plan.snapshot):
            writer.apply(decoder, decoder.feed(chunk), plan.target_txid)
        decoder.close()


async def _apply_segments(
    client: ReplicaClient, plan: RestorePlan, writer: _PageWriter, prefetch: int
) -> None:
    """Download up to `prefetch` segments ahead while applying them strictly in order."""
    try:
        await _apply_in_order(client, plan, writer, prefetch)
    except BaseExceptionGroup as group:
        # One root cause ends a restore; report it as itself, not as a group of one.
        raise _root_cause(group) from None


def _root_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _root_cause(first) if isinstance(first, BaseExceptionGroup) else first


async def _apply_in_order(
    client: ReplicaClient, plan: RestorePlan, writer: _PageWriter, prefetch: int
) -> None:
    """Small objects are downloaded ahead (at most `prefetch` and `PREFETCH_BYTES` at a time);
    a large one (a compacted level) is streamed when its turn comes, so memory stays bounded
    whatever the objects' sizes."""
    sizes = dict(zip(plan.objects, plan.sizes, strict=True))
    window: deque[tuple[ObjectName, asyncio.Task[bytes] | None]] = deque()
    pending = deque(plan.segments)
    in_flight = 0
    async with asyncio.TaskGroup() as tg:
        while pending or window:
            while pending and len(window) < max(1, prefetch):
                size = sizes[pending[0]]
                if size > STREAM_ABOVE:
                    window.append((pending.popleft(), None))
                    break
                if window and in_flight + size > PREFETCH_BYTES:
                    break
                name = pending.popleft()
                window.append((name, tg.create_task(client.get_object(name.key))))
                in_flight += size
            name, download = window.popleft()
            decoder = ObjectDecoder(expected=name)
            with _naming(client, name):
                if download is None:
                    async for chunk in _iter(client, name):
                        writer.apply(decoder, decoder.feed(chunk), plan.target_txid)
                else:
                    data = memoryview(await download)
                    in_flight -= sizes[name]
                    for start in range(0, len(data), _FEED_BYTES):
                        part = data[start : start + _FEED_BYTES]
                        writer.apply(decoder, decoder.feed(part), plan.target_txid)
                decoder.close()


@contextlib.contextmanager
def _naming(client: ReplicaClient, name: ObjectName) -> Iterator[None]:
    """Say which object was bad. (The partial OUT.tmp is removed: no page reaches OUT.)"""
    try:
        yield
    except FormatError as exc:
        raise FormatError(
            f"{name.key} in {client.url} is damaged: {exc.message}",
            hint=f"restore an earlier point (--txid {name.first_txid - 1}) or another replica; "
            "keep the damaged object for investigation",
        ) from exc


async def _iter(client: ReplicaClient, name: ObjectName) -> AsyncIterator[bytes]:
    async for chunk in client.iter_object(name.key):
        yield chunk


class _PageWriter:
    """Writes decoded pages at their offsets; remembers the target's database size.

    Runs of consecutive pages (a snapshot is one long run) go out in one `pwritev`: one system
    call per page made restores of 4 KiB pages twice as slow.  Pages are written in the order
    they arrive, so the newest version of a page still wins.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.page_size = 0
        self.db_pages = 0
        self.applied_txid = 0
        self._run_start = 0
        self._run: list[bytes] = []

    def apply(self, decoder: ObjectDecoder, events: Sequence[object], target: int) -> None:
        if decoder.header is not None:
            self._check_page_size(decoder.header.page_size)
        for event in events:
            if isinstance(event, PageEvent):
                if event.txid <= target:
                    self._write(event.pgno, event.data)
            elif isinstance(event, TxnEndEvent) and event.info.txid <= target:
                self.db_pages = event.info.db_pages
                self.applied_txid = event.info.txid
            elif isinstance(event, EndEvent):
                continue

    def _check_page_size(self, page_size: int) -> None:
        if self.page_size and page_size != self.page_size:
            raise RestoreError(
                f"objects disagree on page size ({self.page_size} and {page_size})",
                hint="the replica mixes databases; restore from a clean prefix",
            )
        self.page_size = page_size

    def _write(self, pgno: int, data: bytes) -> None:
        if self._run and pgno != self._run_start + len(self._run):
            self._flush()
        if not self._run:
            self._run_start = pgno
        self._run.append(data)
        if len(self._run) >= _WRITE_RUN_PAGES:
            self._flush()

    def _flush(self) -> None:
        if self._run:
            wanted = len(self._run) * self.page_size
            if os.pwritev(self.fd, self._run, (self._run_start - 1) * self.page_size) != wanted:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # short write: disk full
            self._run = []

    def finish(self) -> None:
        self._flush()
        os.ftruncate(self.fd, self.db_pages * self.page_size)
        os.fsync(self.fd)


def _check_integrity(path: Path, mode: str) -> None:
    if mode == "none":
        return
    pragma = "quick_check" if mode == "quick" else "integrity_check"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}")]
    except sqlite3.DatabaseError as exc:
        raise RestoreError(f"restored file is not a valid database: {exc}") from exc
    finally:
        conn.close()
    if rows != ["ok"]:
        raise RestoreError(
            f"integrity check of the restored database failed: {'; '.join(rows[:5])}",
            hint="the replica may be damaged; try an earlier --txid or another replica",
        )


def _move_into_place(tmp: Path, output: Path, force: bool) -> None:
    # A stale -wal beside the target would be replayed onto the restored file and corrupt it.
    _remove_quietly(_sidecar(tmp, "-wal"), _sidecar(tmp, "-shm"))
    _remove_quietly(_sidecar(output, "-wal"), _sidecar(output, "-shm"))
    if force:
        os.replace(tmp, output)
    else:
        try:
            os.link(tmp, output)  # no-clobber: fails if the target appeared meanwhile
        except FileExistsError as exc:
            raise RestoreError(f"{output} appeared during the restore; not replacing it") from exc
        tmp.unlink()
    dir_fd = os.open(output.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _remove_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
