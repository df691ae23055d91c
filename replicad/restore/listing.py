"""Planning against a replica: list only the keys a plan can use, and find the TXID at a moment.

`make_plan` is the entry point; the listing strategy is described below ("planning from a
bounded listing").  Transaction times come from segment trailers read with range requests
(`read_trailer_of`), never from whole objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import Iterable, Sequence

from replicad.clients.base import ReplicaClient
from replicad.errors import FormatError, HistoryForkError, RestoreError
from replicad.format import TxnInfo, read_index, trailer_span
from replicad.position import (
    NO_CHECKSUM,
    SEGMENT_PREFIX,
    SNAPSHOT_PREFIX,
    ObjectKind,
    ObjectName,
)
from replicad.restore.download import root_cause
from replicad.restore.plan import (
    Landing,
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
    """The last TXID committed at or before `at_ns`, exactly (commit times as replicad saw them),
    from a full listing; `make_plan` finds it from a bounded listing, and this is its fallback.
    """
    return (await landing_at(client, names, at_ns)).txid


async def landing_at(client: ReplicaClient, names: dict[ObjectName, int], at_ns: int) -> Landing:
    """`txid_at` with the state's commit time and the state after it.

    Key names narrow the search to one segment; its trailer gives each transaction's time.
    """
    at_ms = at_ns // 1_000_000
    found: tuple[int, int] | None = None  # (TXID, commit time in ns)
    snapshots = [n for n in names if n.kind is ObjectKind.SNAPSHOT and n.max_time_ms < at_ms]
    if snapshots:
        found = (max(snapshots).last_txid, -1)  # its commit time is looked up below
    segments = sorted(
        (n for n in names if n.kind is ObjectKind.SEGMENT and n.level == 0),
        key=lambda n: n.first_txid,
    )
    for name in segments:
        if name.max_time_ms < at_ms:
            found = max(found or (0, 0), (name.last_txid, name.max_time_ms * 1_000_000))
        elif name.min_time_ms <= at_ms:
            for info in await read_trailer_of(client, name, names[name]):
                if info.commit_time_ns <= at_ns:
                    found = max(found or (0, 0), (info.txid, info.commit_time_ns))
    if found is None:
        raise RestoreError(
            "no transaction in the replica was committed at or before that time",
            hint="the oldest restorable moment is the oldest snapshot's; see `replicad ls`",
        )
    txid, commit_ns = found
    if commit_ns < 0:
        commit_ns = await _snapshot_commit_ns(client, max(snapshots), names[max(snapshots)])
    after = [n for n in segments if n.last_txid > txid and n.first_txid <= txid + 1]
    nxt = await _state_after_txid(client, names, after, txid)
    return Landing(at_ns, txid, commit_ns, *nxt)


async def _snapshot_commit_ns(client: ReplicaClient, name: ObjectName, size: int) -> int:
    """When the snapshot's TXID was committed (its key says when it was taken, later)."""
    return (await read_trailer_of(client, name, size))[-1].commit_time_ns


async def _state_after_txid(
    client: ReplicaClient,
    sizes: dict[ObjectName, int],
    holding: Sequence[ObjectName],
    txid: int,
) -> tuple[int | None, int | None]:
    """(TXID, commit time) of the state right after `txid`, from the first of the level-0
    segments `holding` it (none: no later state is kept).
    """
    if not holding:
        return None, None
    name = min(holding, key=lambda n: (n.level, n.first_txid))
    if name.first_txid == txid + 1:
        return name.first_txid, name.min_time_ms * 1_000_000
    for info in await read_trailer_of(client, name, sizes[name]):
        if info.txid == txid + 1:
            return info.txid, info.commit_time_ns
    return None, None


#: Bytes read from an object's end to get its trailer in one request, most of the time (the
#: trailer of a segment of ~1,500 transactions); a longer trailer costs one request more.
TAIL_GUESS = 64 << 10


async def read_trailer_of(client: ReplicaClient, name: ObjectName, size: int) -> list[TxnInfo]:
    """Every transaction of object `name` (`size` bytes, as listed), from its trailer read
    with ranged GETs: the bytes read are the trailer's, whatever the object's size (a segment
    can hold a multi-GB transaction).  Checked against the name: TXIDs, checksums, size.

    (Explicit ranges: `rclone serve s3` refuses a suffix range longer than the object.)
    """
    guess = min(size, TAIL_GUESS)
    tail = memoryview(await client.get_range(name.key, size - guess, guess))
    span = trailer_span(tail)
    if span > len(tail) and span <= size:
        tail = memoryview(await client.get_range(name.key, size - span, span))
    index = read_index(tail)
    txns = index.transactions
    problem = None
    if (txns[0].txid, txns[-1].txid) != (name.first_txid, name.last_txid):
        problem = f"its trailer holds TXIDs {txns[0].txid}..{txns[-1].txid}"
    elif index.object_length != size:
        problem = f"its footer says {index.object_length} bytes, the listing {size}"
    elif name.chained and index.checksums is not None and index.checksums[-1] != name.post:
        problem = "its trailer's last checksum is not the one in its key"
    if problem:
        raise FormatError(f"object {name.key} does not match its name: {problem}")
    return txns


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
    landing = None
    if at_ns is not None and names:
        landing = await landing_at(client, names, at_ns)
        target_txid = landing.txid
    return dataclasses.replace(plan_restore(names, target_txid=target_txid), landing=landing)


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
    landing = None
    if at_ns is not None:
        landing = await _landing_bounded(listing, at_ns)
        target_txid = landing.txid
    snapshot = listing.snapshot_for(target_txid)
    await _list_for_chain(listing, snapshot.last_txid, target_txid, _state_after(snapshot))
    plan = dataclasses.replace(
        plan_restore(listing.names, target_txid=target_txid), landing=landing
    )
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
    above it stops, highest level first, and none once the chain reaches the target.
    """
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


async def _landing_bounded(listing: _BoundedListing, at_ns: int) -> Landing:
    """`landing_at` from a bounded listing: the same TXID while level 0 holds every commit after
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
    if found is not None and found[0] > base:
        return Landing(at_ns, *found)
    commit_ns = await _snapshot_commit_ns(listing.client, snapshot, listing.names[snapshot])
    if not chain:
        return Landing(at_ns, base, commit_ns)
    return Landing(at_ns, base, commit_ns, chain[0].first_txid, chain[0].min_time_ms * 1_000_000)


async def _last_committed(
    listing: _BoundedListing, chain: Sequence[ObjectName], at_ns: int
) -> tuple[int, int, int | None, int | None] | None:
    """The last TXID in `chain` committed at or before `at_ns`, its commit time, and the TXID
    and commit time of the state after it (None if the chain holds none); None if no TXID
    in `chain` was committed by then.

    Searched from the newest segment back: the first one that starts early enough holds it, as
    every TXID after it committed later (clock steps back included).  A compacted segment is
    narrowed down through the segments it was merged from, a level-0 one by its trailer.
    """
    at_ms = at_ns // 1_000_000
    later: tuple[int | None, int | None] = (None, None)  # the state after the segment looked at
    for name in reversed(chain):
        found: tuple[int, int, int | None, int | None] | None = None
        if name.min_time_ms > at_ms:
            pass
        elif name.max_time_ms < at_ms:
            found = (name.last_txid, name.max_time_ms * 1_000_000, *later)
        elif name.level == 0:
            txns = await read_trailer_of(listing.client, name, listing.names[name])
            before = [i for i, info in enumerate(txns) if info.commit_time_ns <= at_ns]
            if before:
                i = before[-1]
                nxt = (txns[i + 1].txid, txns[i + 1].commit_time_ns) if i + 1 < len(txns) else later
                found = (txns[i].txid, txns[i].commit_time_ns, *nxt)
        else:
            inner = await _last_committed(listing, await _sources(listing, name), at_ns)
            if inner is not None:
                found = inner if inner[2] is not None else (*inner[:2], *later)
        if found is not None:
            return found
        later = (name.first_txid, name.min_time_ms * 1_000_000)
    return None


async def _sources(listing: _BoundedListing, name: ObjectName) -> list[ObjectName]:
    """The chain of lower-level segments covering exactly the TXIDs of compacted `name`."""
    after, checksum = name.first_txid - 1, name.pre if name.chained else NO_CHECKSUM
    await _list_for_chain(listing, after, name.last_txid, checksum, below=name.level)
    chain = _chain(_Segments(listing.segments(name.level)), after, name.last_txid, checksum)
    if chain[-1].last_txid != name.last_txid:
        raise RestoreError(f"the segments below {name.key} do not end where it does")
    return chain
