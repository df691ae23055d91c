"""Compaction: merge runs of segments into coarser levels (planning and merging are pure).

A restore reads the newest snapshot and every segment after it.  A level-0 segment holds one
upload batch (about a second of commits), so a day of history can be 86,400 objects.  A
compacted segment of level n covers the same TXIDs as the run of lower-level segments it was
merged from: the newest version of each page wins, pages beyond the database size at the end of
the run are dropped, and every transaction keeps its record (TXID, commit time, database size)
while its pages move into the run's last record (`docs/format.md`).  A restore to a point after
the run then reads one object instead of many.  Nothing is deleted here: level-0 segments stay
for restores that stop at a single transaction, and retention removes every level once a newer
snapshot makes it unnecessary.

Levels and buckets
    Level n groups segments into buckets of `levels[n-1]` seconds by the commit time of their
    last transaction (30 s, 5 min and 1 h by default).  Each width is a multiple of the one
    below, so a bucket holds whole buckets of the level below.  A bucket is compacted once it
    is closed and `settle_ms` more have passed, so that uploads of its segments have landed.

Sources
    In a bucket, a level-n job merges a chain of segments below level n, each the one that
    reaches furthest from where the previous one ended: normally the bucket's level-(n-1)
    outputs.  A bucket waits while a lower-level job inside it is still to be run, so level 2
    is built from level 1, not from a thousand level-0 objects.  A run of one object is not
    copied, so where a level has nothing to merge (a quiet database writes once a minute) the
    next level takes the objects below it directly and the hourly object still appears.

Boundaries
    Outputs start and end where sources do, hence on level-0 boundaries.  A restore that stops
    inside a compacted range therefore always finds a level-0 segment starting where its chain
    has reached, and applies that one partly; a compacted segment, whose pages all sit in its
    last record, is never applied partly (`replicad.restore.plan_restore`).

Runs
    A chain stops at a TXID gap (the snapshot after a lost continuity jumps the TXIDs) and
    where commit times go backwards (a clock stepped back across a restart), because an
    object's commit times never decrease.  A run already covered by level-n segments is
    skipped.  A run only partly covered (a segment uploaded after its bucket had settled) is
    merged again as a whole: the duplicate is harmless and the restore planner takes whichever
    segment reaches furthest.

Memory and size
    `compact` streams one source at a time through the decoder into a page map kept on local
    disk (`replicad.spool`), and encodes its outputs into a local file uploaded from there, so
    memory holds page numbers, not pages.  `max_merge_bytes` bounds an output's pages: a job
    whose pages would exceed it is cut, between sources, into several contiguous objects.
"""

from __future__ import annotations

import asyncio
import bisect
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from replicad.clients.base import ReplicaClient
from replicad.errors import FormatError
from replicad.fence import PutFile
from replicad.format import (
    EndEvent,
    ObjectDecoder,
    ObjectHeader,
    ObjectWriter,
    PageEvent,
    SupportsWrite,
    Transaction,
    TxnInfo,
    TxnStartEvent,
    object_name,
)
from replicad.position import ObjectKind, ObjectName
from replicad.private import create_private, make_private_dir, unpredictable_name
from replicad.spool import PageSpool

#: Seconds per bucket of level 1, 2, 3: each a multiple of the one before.
DEFAULT_LEVELS: tuple[float, ...] = (30.0, 300.0, 3600.0)
#: How long after a bucket ends its segments may still be arriving (an upload batch, retries).
DEFAULT_SETTLE_MS = 5000
#: Page bytes one merged object may hold; a larger job is cut into several objects.
#: Merges live on disk (`replicad.spool`), so this bounds object size and the state directory,
#: not memory; larger outputs drop more superseded page versions for a restore to download.
DEFAULT_MAX_MERGE_BYTES = 256 << 20

_MAX_LEVEL = 99  # the format's limit (one byte, 0..99)
#: Bytes of a cached source handed to the decoder at a time (it buffers what it is fed).
_FEED_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class CompactionJob:
    """Merge `sources` into segments of `level`.

    The sources are segments of levels below `level` (normally `level - 1`), in TXID order,
    each starting right after the previous one ends.  ValueError otherwise.
    """

    level: int
    sources: tuple[ObjectName, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.level <= _MAX_LEVEL:
            raise ValueError(f"compaction level {self.level} out of range 1..{_MAX_LEVEL}")
        if not self.sources:
            raise ValueError("a compaction job needs at least one source")
        before = None
        for name in self.sources:
            if problem := _source_problem(before, name, self.level):
                raise ValueError(f"invalid compaction job: {problem}")
            before = name


def _source_problem(before: ObjectName | None, name: ObjectName, level: int) -> str | None:
    """Why `name` cannot be merged into `level` right after `before`, or None."""
    if name.kind is not ObjectKind.SEGMENT:
        return f"{name.key} is not a segment"
    if name.level >= level:
        return f"{name.key} is not below level {level}"
    if before is not None and name.first_txid != before.last_txid + 1:
        return f"{name.key} does not start right after {before.key}"
    if before is not None and before.chained and not name.follows(before.post):
        return f"{name.key} does not continue the history of {before.key} (checksums differ)"
    return None


# ---------------------------------------------------------------------------------------------
# Planning


def plan_compaction(
    objects: Iterable[ObjectName],
    *,
    levels: Sequence[float] = DEFAULT_LEVELS,
    now_ms: int,
    settle_ms: int = DEFAULT_SETTLE_MS,
) -> list[CompactionJob]:
    """The compaction jobs worth running now, by level then TXID. Pure.

    Buckets of level n (`levels[n-1]` seconds, by the last commit time of each segment) are
    planned once `now_ms >= bucket end + settle_ms`; see the module docstring for which runs
    become jobs.  Running the jobs in order and planning again converges: a bucket is planned
    again only while it is not covered at its level.
    """
    if settle_ms < 0:
        raise ValueError(f"settle_ms {settle_ms} must not be negative")
    widths = _bucket_widths(levels)
    segments = sorted(
        (n for n in objects if n.kind is ObjectKind.SEGMENT),
        key=lambda n: (n.first_txid, n.level, n.last_txid),
    )
    jobs: list[CompactionJob] = []
    unfinished: list[int] = []  # last commit time (ms) of each run planned at a lower level
    for level, width in enumerate(widths, start=1):
        covered = _Coverage(n for n in segments if n.level == level)
        waiting = {t // width for t in unfinished}
        buckets = _closed_buckets(segments, level, width, closed_by=now_ms - settle_ms)
        for bucket in sorted(buckets.keys() - waiting):
            for run in _runs(buckets[bucket]):
                if len(run) > 1 and not covered.covers(run[0].first_txid, run[-1].last_txid):
                    jobs.append(CompactionJob(level, tuple(run)))
                    unfinished.append(run[-1].max_time_ms)
    return jobs


def _bucket_widths(levels: Sequence[float]) -> list[int]:
    """Bucket widths in ms; ValueError unless each is a larger multiple of the one before."""
    if len(levels) > _MAX_LEVEL:
        raise ValueError(f"at most {_MAX_LEVEL} compaction levels, not {len(levels)}")
    widths = [round(seconds * 1000) for seconds in levels]
    for n, width in enumerate(widths, start=1):
        below = widths[n - 2] if n > 1 else 0
        if width <= below or (below and width % below):
            raise ValueError(
                f"compaction level {n}: {levels[n - 1]} s must be positive and a larger "
                "multiple of the level below, so each bucket holds whole buckets below it"
            )
    return widths


def _closed_buckets(
    segments: Iterable[ObjectName], level: int, width: int, *, closed_by: int
) -> dict[int, list[ObjectName]]:
    """Segments below `level` in buckets that ended by `closed_by` (ms), in TXID order."""
    buckets: dict[int, list[ObjectName]] = {}
    for name in segments:
        bucket = name.max_time_ms // width
        if name.level < level and (bucket + 1) * width <= closed_by:
            buckets.setdefault(bucket, []).append(name)
    return buckets


def _runs(members: Sequence[ObjectName]) -> list[list[ObjectName]]:
    """Chains of segments, each taking the one reaching furthest from where the last ended.

    A chain stops at a TXID gap, where commit times go backwards, and where the database
    checksums do not chain (another history's object: it is never merged into this one).
    """
    furthest: dict[int, ObjectName] = {}
    for name in members:
        held = furthest.get(name.first_txid)
        if held is None or (name.last_txid, name.level) > (held.last_txid, held.level):
            furthest[name.first_txid] = name
    runs: list[list[ObjectName]] = []
    for first in sorted(furthest):
        name = furthest[first]
        last = runs[-1][-1] if runs else None
        if last is not None and first <= last.last_txid:
            continue  # inside a segment the chain already holds
        if (
            last is not None
            and first == last.last_txid + 1
            and name.min_time_ms >= last.max_time_ms
            and (not last.chained or name.follows(last.post))
        ):
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs


class _Coverage:
    """The TXIDs a set of segments holds, as sorted disjoint ranges."""

    def __init__(self, names: Iterable[ObjectName]) -> None:
        self._firsts: list[int] = []
        self._lasts: list[int] = []
        for name in sorted(names, key=lambda n: n.first_txid):
            if self._lasts and name.first_txid <= self._lasts[-1] + 1:
                self._lasts[-1] = max(self._lasts[-1], name.last_txid)
            else:
                self._firsts.append(name.first_txid)
                self._lasts.append(name.last_txid)

    def covers(self, first: int, last: int) -> bool:
        """Whether every TXID of `first..last` is held."""
        i = bisect.bisect_right(self._firsts, first) - 1
        return i >= 0 and self._lasts[i] >= last


# ---------------------------------------------------------------------------------------------
# Merging


def merge_segments(
    decoded: Sequence[tuple[ObjectHeader, list[Transaction]]], *, level: int
) -> tuple[ObjectName, ObjectHeader, list[Transaction]]:
    """Merge decoded consecutive segments into one segment of `level`. Pure.

    The output has one record per TXID with its commit time and database size; all pages,
    newest version of each, ascending, without those beyond the final database size, are in
    the last record (page count 0 in the others).  Its WAL position and codec are the last
    input's.  Raises FormatError when the inputs disagree on page size or their commit times
    go backwards; ValueError when they are not consecutive segments below `level`.
    """
    if not decoded:
        raise ValueError("nothing to merge")
    spool_dir = Path(tempfile.gettempdir())
    merger = _Merger(level)
    try:
        for header, transactions in decoded:
            merger.check(header, [t.info for t in transactions])  # before spooling its pages
            pages = PageSpool(spool_dir, header.page_size)
            for txn in transactions:
                for pgno, data in txn.pages:
                    pages.put(pgno, data)
            checksums = [t.checksum for t in transactions]
            recorded = None if None in checksums else [c for c in checksums if c is not None]
            merger.add(_Source(header, [t.info for t in transactions], pages, recorded))
        name, header = merger.name_and_header()
        return name, header, merger.records(materialize=True)
    finally:
        merger.close()


@dataclass(slots=True)
class _Source:
    """One decoded source: its header, transaction records and pages (newest version each)."""

    header: ObjectHeader
    infos: list[TxnInfo]
    pages: PageSpool
    #: The database checksum after each transaction (None: the source records none).
    checksums: list[int] | None = None


class _Merger:
    """Merges consecutive segments into one, a source at a time, newest page winning.

    The merged pages live in a `PageSpool` on local disk, so a merge costs memory for page
    numbers only, whatever the size of the sources.
    """

    def __init__(self, level: int) -> None:
        self._level = level
        self._first: ObjectHeader | None = None
        self._last: ObjectHeader | None = None
        self._infos: list[TxnInfo] = []
        self._pages: PageSpool | None = None
        self._checksums: list[int] = []
        self._chained = True

    @property
    def empty(self) -> bool:
        return self._last is None

    def fits(self, source: _Source, limit: int) -> bool:
        """Whether `source` can join the same object: times go on, pages stay in `limit`.

        Always true for the first source, whatever its size.
        """
        last = self._last
        if last is None or self._pages is None:
            return True
        if source.header.min_time_ns < last.max_time_ns:
            return False
        added = sum(1 for pgno in source.pages.pgnos() if pgno not in self._pages)
        return (len(self._pages) + added) * last.page_size <= limit

    def add(self, source: _Source) -> None:
        """Take the next source (and its spool); see `merge_segments` for what is refused."""
        self.check(source.header, source.infos)
        self._chained = self._chained and source.checksums is not None
        self._first = self._first or source.header
        self._last = source.header
        self._infos.extend(source.infos)
        self._checksums.extend(source.checksums or [0] * len(source.infos))
        if self._pages is None:
            self._pages = source.pages  # the first source's spool becomes the merge's
            return
        for pgno, data in source.pages.items():  # in order, so the newest version stays
            self._pages.put(pgno, data)
        source.pages.close()

    def close(self) -> None:
        if self._pages is not None:
            self._pages.close()

    def check(self, header: ObjectHeader, infos: Sequence[TxnInfo]) -> None:
        """Raise unless a source with this header and these records can be added next."""
        last = self._last
        before = object_name(last) if last is not None else None
        if problem := _source_problem(before, object_name(header), self._level):
            raise ValueError(f"cannot merge: {problem}")
        txids = [i.txid for i in infos]
        if txids != list(range(header.first_txid, header.last_txid + 1)):
            raise ValueError(f"cannot merge: transactions {txids} do not match their header")
        if last is None:
            return
        if header.page_size != last.page_size:
            raise FormatError(
                f"segments disagree on page size: {last.page_size} up to TXID {last.last_txid}, "
                f"{header.page_size} from {header.first_txid}",
                hint="the replica mixes databases; compact and restore from a clean prefix",
            )
        if header.min_time_ns < last.max_time_ns:
            raise FormatError(
                f"commit times go backwards between TXIDs {last.last_txid} and "
                f"{header.first_txid}; such segments cannot share an object"
            )

    def name_and_header(self) -> tuple[ObjectName, ObjectHeader]:
        """The merged segment's name and header."""
        first, last = self._first, self._last
        assert first is not None, "no source added"
        assert last is not None
        final = self._infos[-1]
        # Checksums only when every source had them: one v1 source and the merge proves nothing.
        chained = self._chained and first.chained
        header = ObjectHeader(
            kind=ObjectKind.SEGMENT,
            page_size=last.page_size,
            level=self._level,
            first_txid=first.first_txid,
            last_txid=last.last_txid,
            min_time_ns=first.min_time_ns,
            max_time_ns=last.max_time_ns,
            db_pages=final.db_pages,
            position=last.position,
            codec=last.codec,
            pre_checksum=first.pre_checksum if chained else None,
            post_checksum=last.post_checksum if chained else None,
        )
        return object_name(header), header

    def records(self, *, materialize: bool = False) -> list[Transaction]:
        """One record per TXID; the pages (ascending, none beyond the final size) in the last.

        Pages are left out (for `write`) unless `materialize`.
        """
        assert self._pages is not None, "no source added"
        final = self._infos[-1]
        chained = self.name_and_header()[1].chained
        checksums = self._checksums if chained else [None] * len(self._infos)
        records = [
            Transaction(TxnInfo(i.txid, i.commit_time_ns, i.db_pages, 0), [], checksum)
            for i, checksum in zip(self._infos[:-1], checksums, strict=False)
        ]
        kept = sum(1 for p in self._pages.pgnos() if p <= final.db_pages)
        pages = list(self._pages.items(upto=final.db_pages)) if materialize else []
        info = TxnInfo(final.txid, final.commit_time_ns, final.db_pages, kept)
        records.append(Transaction(info, pages, checksums[-1]))
        return records

    def write(self, sink: SupportsWrite) -> int:
        """Stream the merged segment into `sink`; its size."""
        assert self._pages is not None, "no source added"
        _, header = self.name_and_header()
        writer = ObjectWriter(sink, header)
        records = self.records()
        for record in records:
            i = record.info
            writer.begin_transaction(
                i.txid, i.commit_time_ns, i.db_pages, i.page_count, record.checksum
            )
        for pgno, data in self._pages.items(upto=records[-1].info.db_pages):
            writer.add_page(pgno, data)
        return writer.finish()


# ---------------------------------------------------------------------------------------------
# Running a job


async def compact(
    client: ReplicaClient,
    job: CompactionJob,
    *,
    cache: Mapping[ObjectName, bytes] | None = None,
    max_merge_bytes: int = DEFAULT_MAX_MERGE_BYTES,
    spool_dir: Path | None = None,
    writer: PutFile | None = None,
) -> list[tuple[ObjectName, int]]:
    """Run `job`: fetch, verify and merge its sources, write the merged segments.

    Sources come from `cache` when it holds them (what was just uploaded), else are streamed
    from the replica; each is decoded, verified against its name, into a page spool in
    `spool_dir` (the system's temporary directory by default), then merged in turn.  When the
    next one would take the merged pages past `max_merge_bytes` (or its commit times go back),
    the merge so far is written and a new object begins, so the outputs cover contiguous parts
    of the job.  A part may hold a single source, copied to the new level so that the job's
    range counts as compacted and is not planned again.  Outputs are encoded into a local file
    and uploaded from it with `writer` (the daemon's `FencedWriter`: lease-checked and
    create-only; `client` when None).  Memory holds page numbers, one block and the client's
    upload parts, whatever the size of the sources.  Returns `(name, size)` of every object
    written, in TXID order.  Never deletes anything.

    Raises FormatError for a corrupt source, before writing the object it belongs to (objects
    for parts wholly before it may already be written: they are correct, and rewritten
    identically by a retry, which create-only accepts); ObjectNotFoundError for a missing
    source; other ReplicaErrors; StateError when the spool directory is full.
    """
    if max_merge_bytes < 1:
        raise ValueError(f"max_merge_bytes {max_merge_bytes} must be positive")
    directory = spool_dir or Path(tempfile.gettempdir())
    out = writer or client
    written: list[tuple[ObjectName, int]] = []
    merger = _Merger(job.level)
    try:
        for name in job.sources:
            source = await _load(client, name, cache, directory)
            if not merger.fits(source, max_merge_bytes):
                written.append(await _write(out, merger, directory))
                merger.close()
                merger = _Merger(job.level)
            try:
                merger.add(source)
            except BaseException:
                source.pages.close()
                raise
        written.append(await _write(out, merger, directory))
    finally:
        merger.close()
    return written


async def _load(
    client: ReplicaClient,
    name: ObjectName,
    cache: Mapping[ObjectName, bytes] | None,
    spool_dir: Path,
) -> _Source:
    """Decode one source into a page spool, streaming it from the cache or the replica."""
    reader = _SourceReader(name, spool_dir)
    try:
        if cache is not None and (data := cache.get(name)) is not None:
            await asyncio.to_thread(reader.feed_all, data)
        else:
            async for chunk in client.iter_object(name.key):
                # zstd and the spool writes release the GIL: the event loop keeps serving.
                await asyncio.to_thread(reader.feed, chunk)
        return await asyncio.to_thread(reader.finish)
    except BaseException:
        reader.discard()
        raise


class _SourceReader:
    """Feeds one object's bytes through the decoder into a page spool."""

    def __init__(self, name: ObjectName, spool_dir: Path) -> None:
        self._decoder = ObjectDecoder(expected=name)
        self._spool_dir = spool_dir
        self._pages: PageSpool | None = None
        self._infos: list[TxnInfo] = []
        self._checksums: list[int] | None = None
        self._complete = False

    def feed_all(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), _FEED_BYTES):
            self.feed(view[start : start + _FEED_BYTES])

    def feed(self, chunk: bytes | memoryview) -> None:
        for event in self._decoder.feed(chunk):
            if isinstance(event, PageEvent):
                self._spool().put(event.pgno, event.data)
            elif isinstance(event, TxnStartEvent):
                self._infos.append(event.info)
            elif isinstance(event, EndEvent):
                self._checksums = event.checksums
                self._complete = True

    def finish(self) -> _Source:
        self._decoder.close()
        header = self._decoder.header
        assert header is not None
        assert self._complete, "the decoder closed without its end event"
        return _Source(header, self._infos, self._spool(), self._checksums)

    def discard(self) -> None:
        if self._pages is not None:
            self._pages.close()

    def _spool(self) -> PageSpool:
        if self._pages is None:
            header = self._decoder.header
            assert header is not None, "pages before the header"
            self._pages = PageSpool(self._spool_dir, header.page_size)
        return self._pages


async def _write(out: PutFile, merger: _Merger, spool_dir: Path) -> tuple[ObjectName, int]:
    name, _ = merger.name_and_header()
    path = spool_dir / unpredictable_name(f"compact-{name.level:02d}-{name.last_txid:016x}")
    try:
        size = await asyncio.to_thread(_write_file, merger, path)
        await out.put_file(name.key, path)
    finally:
        path.unlink(missing_ok=True)
    return name, size


def _write_file(merger: _Merger, path: Path) -> int:
    make_private_dir(path.parent)
    with create_private(path) as sink:
        return merger.write(sink)
