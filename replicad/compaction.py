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

Memory
    `compact` decodes one source at a time into a page map bounded by `max_merge_bytes`; a job
    whose pages would exceed it is cut, between sources, into several contiguous objects.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from replicad.clients.base import ReplicaClient
from replicad.errors import FormatError
from replicad.format import ObjectHeader, Transaction, TxnInfo, decode_object, encode_object
from replicad.position import ObjectKind, ObjectName, segment_name

#: Seconds per bucket of level 1, 2, 3: each a multiple of the one before.
DEFAULT_LEVELS: tuple[float, ...] = (30.0, 300.0, 3600.0)
#: How long after a bucket ends its segments may still be arriving (an upload batch, retries).
DEFAULT_SETTLE_MS = 5000
#: Page bytes one merge may hold; a larger job is cut into several objects rather than exceed it.
DEFAULT_MAX_MERGE_BYTES = 64 << 20

_MAX_LEVEL = 99  # the format's limit (one byte, 0..99)


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

    A chain stops at a TXID gap and where commit times go backwards.
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
    merger = _Merger(level)
    for header, transactions in decoded:
        merger.add(header, transactions)
    return merger.result()


class _Merger:
    """Merges consecutive segments into one, a source at a time, newest page winning."""

    def __init__(self, level: int) -> None:
        self._level = level
        self._first: ObjectHeader | None = None
        self._last: ObjectHeader | None = None
        self._infos: list[TxnInfo] = []
        self._pages: dict[int, bytes] = {}

    def fits(self, header: ObjectHeader, transactions: Sequence[Transaction], limit: int) -> bool:
        """Whether this source can join the same object: times go on, pages stay in `limit`.

        Always true for the first source, whatever its size: it is in memory already.
        """
        last = self._last
        if last is None:
            return True
        if header.min_time_ns < last.max_time_ns:
            return False
        added = {pgno for t in transactions for pgno, _ in t.pages if pgno not in self._pages}
        return (len(self._pages) + len(added)) * last.page_size <= limit

    def add(self, header: ObjectHeader, transactions: Sequence[Transaction]) -> None:
        """Take the next source; see `merge_segments` for what is refused."""
        self._check(header, transactions)
        self._first = self._first or header
        self._last = header
        for txn in transactions:
            self._infos.append(txn.info)
            self._pages.update(txn.pages)  # in order, so the newest version stays

    def _check(self, header: ObjectHeader, transactions: Sequence[Transaction]) -> None:
        last = self._last
        before = _name_of(last) if last is not None else None
        if problem := _source_problem(before, _name_of(header), self._level):
            raise ValueError(f"cannot merge: {problem}")
        txids = [t.info.txid for t in transactions]
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

    def result(self) -> tuple[ObjectName, ObjectHeader, list[Transaction]]:
        """The merged segment: its name, header and transactions."""
        first, last = self._first, self._last
        assert first is not None, "result() before add()"
        assert last is not None
        final = self._infos[-1]
        pages = [(p, self._pages[p]) for p in sorted(self._pages) if p <= final.db_pages]
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
        )
        records = [
            Transaction(TxnInfo(i.txid, i.commit_time_ns, i.db_pages, 0), [])
            for i in self._infos[:-1]
        ]
        records.append(
            Transaction(
                TxnInfo(final.txid, final.commit_time_ns, final.db_pages, len(pages)), pages
            )
        )
        return _name_of(header), header, records


def _name_of(header: ObjectHeader) -> ObjectName:
    """The key name of a segment, with milliseconds derived as its writer derives them."""
    return segment_name(
        level=header.level,
        first_txid=header.first_txid,
        last_txid=header.last_txid,
        min_time_ms=header.min_time_ns // 1_000_000,
        max_time_ms=header.max_time_ns // 1_000_000,
    )


# ---------------------------------------------------------------------------------------------
# Running a job


async def compact(
    client: ReplicaClient,
    job: CompactionJob,
    *,
    cache: Mapping[ObjectName, bytes] | None = None,
    max_merge_bytes: int = DEFAULT_MAX_MERGE_BYTES,
) -> list[tuple[ObjectName, int]]:
    """Run `job`: fetch, verify and merge its sources, write the merged segments.

    Sources come from `cache` when it holds them (what was just uploaded), else from the
    replica.  Each is verified against its name and merged in turn; when the next one would
    take the page map past `max_merge_bytes` (or its commit times go back), the merge so far
    is written and a new object begins, so the outputs cover contiguous parts of the job.  A
    part may hold a single source, copied to the new level so that the job's range counts as
    compacted and is not planned again.  Returns `(name, size)` of every object written, in
    TXID order.  Never deletes anything.

    Raises FormatError for a corrupt source, before writing the object it belongs to (objects
    for parts wholly before it may already be written: they are correct, and rewritten
    identically by a retry); ObjectNotFoundError for a missing source; other ReplicaErrors.
    """
    if max_merge_bytes < 1:
        raise ValueError(f"max_merge_bytes {max_merge_bytes} must be positive")
    written: list[tuple[ObjectName, int]] = []
    merger = _Merger(job.level)
    for name in job.sources:
        data = await _fetch(client, name, cache)
        # Decoding and encoding run in a thread: zstd releases the GIL, the event loop keeps
        # serving the other databases.
        header, transactions = await asyncio.to_thread(decode_object, data, expected=name)
        del data
        if not merger.fits(header, transactions, max_merge_bytes):
            written.append(await _write(client, merger))
            merger = _Merger(job.level)
        merger.add(header, transactions)
    written.append(await _write(client, merger))
    return written


async def _fetch(
    client: ReplicaClient, name: ObjectName, cache: Mapping[ObjectName, bytes] | None
) -> bytes:
    if cache is not None and (data := cache.get(name)) is not None:
        return data
    return await client.get_object(name.key)


async def _write(client: ReplicaClient, merger: _Merger) -> tuple[ObjectName, int]:
    name, header, transactions = merger.result()
    data = await asyncio.to_thread(encode_object, header, transactions)
    await client.put_object(name.key, data)
    return name, len(data)
