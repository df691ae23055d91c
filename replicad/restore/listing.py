"""Planning against a replica: list only the keys a plan can use, and find the TXID at a moment.

`make_plan` is the entry point; the listing strategy is described below ("planning from a
bounded listing").  Transaction times come from segment trailers read with range requests
(`read_trailer_of`), never from whole objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterable, Sequence

from replicad.clients.base import ReplicaClient
from replicad.errors import FormatError, HistoryForkError, RestoreError
from replicad.format import HEADER_SIZE, TxnInfo, decode_header, read_trailer
from replicad.position import (
    NO_CHECKSUM,
    SEGMENT_PREFIX,
    SNAPSHOT_PREFIX,
    ObjectKind,
    ObjectName,
)
from replicad.restore.download import root_cause
from replicad.restore.plan import (
    RestorePlan,
    _chain,
    _forked,
    _greedy_steps,
    _Segments,
    _snapshot_for,
    _state_after,
    names_from_listing,
    plan_restore,
)

_MAX_TXID = 2**64 - 1
#: One more than the highest segment level (two decimal digits in a key).
_LEVELS = 100
#: A segment level's directory name, as `replicad.position.parse_key` reads it.
_LEVEL_DIR = re.compile(r"\d{2}")


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


async def make_plan(
    client: ReplicaClient, *, target_txid: int | None = None, at_ns: int | None = None
) -> RestorePlan:
    """Plan a restore to a TXID, a moment (`at_ns`), or the newest state.

    Lists only the keys the plan can use (`_plan_bounded`).  When that plan fails (a gap, a
    target out of range, no snapshot early enough), the replica is listed whole and planned
    again, so a failure and its message are exactly `plan_restore`'s over the full listing.
    """
    with contextlib.suppress(RestoreError):
        return await _plan_bounded(client, target_txid, at_ns)
    names = names_from_listing(await client.list_objects())
    if at_ns is not None and names:
        target_txid = await txid_at(client, names, at_ns)
    return plan_restore(names, target_txid=target_txid)


# -- planning from a bounded listing ----------------------------------------------------------
#
# Listing every object costs a LIST request per 1000 keys and, with botocore, about 0.15 ms of
# parsing per key: seconds for a day of history, most of it level-0 segments that a compacted
# segment covers.  Keys sort by TXID within a level, so the planner lists each level only from
# where the chain over the levels above it stops, and only up to the target.  This makes the
# plan `plan_restore` makes from the full listing, given what compaction ensures:
#
# * no segment reaches further than a higher-level one starting at the same TXID (a level-n
#   segment starts with the furthest-reaching segment below it);
# * within a level, a segment that starts later also ends later, so the newest TXID is the end
#   of some level's last key, which the listing of "latest" always reaches;
# * level 0 holds every commit that a compacted segment holds (for `--timestamp`).
#
# Where the first fails (briefly, while compaction catches up with a late upload) the chain is
# still a valid one from the same snapshot to the same target.  tests/test_restore_plan.py
# checks all this against the full listing's plan on random replicas.


class _BoundedListing:
    """The parts of a replica's listing a plan needs, listed on demand and remembered.

    Snapshots are listed whole (a replica holds few).  Segments are listed per level and per
    window of first TXIDs, which S3 skips to with StartAfter: a window costs a request per 1000
    keys in it whatever the size of its level, and one inside a window listed before is free.
    """

    def __init__(self, client: ReplicaClient) -> None:
        self.client = client
        self.names: dict[ObjectName, int] = {}
        #: The segment level directories ("03", "02", ...), highest level first.
        self.levels: list[str] = []
        self._windows: dict[str, list[tuple[int, int | None]]] = {}

    async def start(self) -> None:
        """List the snapshots and which segment levels exist (two requests, concurrently)."""
        try:
            async with asyncio.TaskGroup() as tg:
                snapshots = tg.create_task(self.client.list_objects(SNAPSHOT_PREFIX))
                dirs = tg.create_task(self.client.list_dirs(SEGMENT_PREFIX))
        except BaseExceptionGroup as group:
            raise root_cause(group) from None
        self.names.update(names_from_listing(snapshots.result()))
        levels = [d for d in dirs.result() if _LEVEL_DIR.fullmatch(d)]
        self.levels = sorted(levels, key=int, reverse=True)

    def snapshot_for(self, target: int | None) -> ObjectName:
        """The newest snapshot at or before `target` (None: the newest of all)."""
        snapshots = [n for n in self.names if n.kind is ObjectKind.SNAPSHOT]
        return _snapshot_for(snapshots, _MAX_TXID if target is None else target)

    def segments(self, below: int = _LEVELS) -> list[ObjectName]:
        """The segments listed so far whose level is below `below`."""
        return [n for n in self.names if n.kind is ObjectKind.SEGMENT and n.level < below]

    async def list_level(self, level: str, first: int, last: int | None) -> None:
        """Make sure the segments of `level` whose first TXID is in `first..last` are known."""
        windows = self._windows.setdefault(level, [])
        if any(lo <= first and (hi is None or (last or _MAX_TXID) <= hi) for lo, hi in windows):
            return
        prefix = f"{SEGMENT_PREFIX}{level}/"
        # A key starts with its first TXID in 16 hex digits, so the 16 digits of `first` sort
        # just before the keys starting there, and those of `last + 1` just after `last`'s.
        end = None if last is None or last >= _MAX_TXID else f"{prefix}{last + 1:016x}"
        listed = await self.client.list_objects(
            prefix, start_after=f"{prefix}{first:016x}", end_before=end
        )
        self.names.update(names_from_listing(listed))
        windows.append((first, last))


async def _plan_bounded(
    client: ReplicaClient, target_txid: int | None, at_ns: int | None
) -> RestorePlan:
    """`plan_restore` over the keys `_list_for_chain` lists; RestoreError if it fails."""
    listing = _BoundedListing(client)
    await listing.start()
    if at_ns is not None:
        target_txid = await _txid_at_bounded(listing, at_ns)
    snapshot = listing.snapshot_for(target_txid)
    await _list_for_chain(listing, snapshot.last_txid, target_txid, _state_after(snapshot))
    plan = plan_restore(listing.names, target_txid=target_txid)
    if plan.warnings or _forked(listing.names):
        # Which side of a fork went on shows only in the whole listing: make_plan lists it.
        raise HistoryForkError("the replica holds more than one history")
    return plan


async def _list_for_chain(
    listing: _BoundedListing,
    after: int,
    target: int | None,
    checksum: int,
    *,
    below: int = _LEVELS,
) -> None:
    """List the segments below level `below` that a chain from (`after`, `checksum`) to
    `target` (None: as far as it goes) can use: each level from where the chain over the levels
    above it stops, highest level first, and none once the chain reaches the target."""
    for level in listing.levels:
        if int(level) >= below:
            continue
        reached = _reach(listing.segments(below), after, target, checksum)
        if target is not None and reached >= target:
            return
        await listing.list_level(level, reached + 1, target)


def _reach(segments: Iterable[ObjectName], after: int, target: int | None, checksum: int) -> int:
    """The TXID the chain from `after` reaches over `segments` without passing `target`."""
    reached = after
    for step in _greedy_steps(_Segments(segments), after, target, checksum):
        reached = step.last_txid
    return reached


async def _txid_at_bounded(listing: _BoundedListing, at_ns: int) -> int:
    """`txid_at` from a bounded listing: the same TXID while level 0 holds every commit after
    the snapshot found here (compaction copies, and retention deletes whole TXID ranges).

    The newest snapshot taken before the moment bounds the answer from below; the chain from it
    to the newest TXID is searched backwards for the last commit at or before the moment.
    """
    at_ms = at_ns // 1_000_000
    taken = [n for n in listing.names if n.kind is ObjectKind.SNAPSHOT and n.max_time_ms < at_ms]
    if not taken:
        raise RestoreError("no snapshot taken before that moment")  # make_plan lists all
    snapshot = max(taken)
    base, checksum = snapshot.last_txid, _state_after(snapshot)
    await _list_for_chain(listing, base, None, checksum)
    segments = listing.segments()
    newest = max((n.last_txid for n in segments), default=base)
    chain = _chain(_Segments(segments), base, newest, checksum)
    found = await _last_committed(listing, chain, at_ns)
    return base if found is None else max(base, found)


async def _last_committed(
    listing: _BoundedListing, chain: Sequence[ObjectName], at_ns: int
) -> int | None:
    """The last TXID in `chain` committed at or before `at_ns`, or None.

    Searched from the newest segment back: the first one that starts early enough holds it, as
    every TXID after it committed later (clock steps back included).  A compacted segment is
    narrowed down through the segments it was merged from, a level-0 one by its trailer.
    """
    at_ms = at_ns // 1_000_000
    for name in reversed(chain):
        if name.min_time_ms > at_ms:
            continue
        if name.max_time_ms < at_ms:
            return name.last_txid
        if name.level == 0:
            data = await listing.client.get_object(name.key)
            found = max(
                (i.txid for i in _trailer(data, name) if i.commit_time_ns <= at_ns), default=None
            )
        else:
            found = await _last_committed(listing, await _sources(listing, name), at_ns)
        if found is not None:
            return found
    return None


async def _sources(listing: _BoundedListing, name: ObjectName) -> list[ObjectName]:
    """The chain of lower-level segments covering exactly the TXIDs of compacted `name`."""
    after, checksum = name.first_txid - 1, name.pre if name.chained else NO_CHECKSUM
    await _list_for_chain(listing, after, name.last_txid, checksum, below=name.level)
    chain = _chain(_Segments(listing.segments(name.level)), after, name.last_txid, checksum)
    if chain[-1].last_txid != name.last_txid:
        raise RestoreError(f"the segments below {name.key} do not end where it does")
    return chain
