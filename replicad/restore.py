"""Restore: plan which objects rebuild the database at a TXID (pure), then apply them (I/O).

Plan: the newest snapshot at or before the target, then the chain of segments that starts
right after it and reaches the target.  A gap in that chain is an error naming the last TXID
that can be restored, never a silently older database.  `make_plan` lists only the keys such a
plan can use, not the whole replica (see "planning from a bounded listing").

Apply: stream each object through the verifying decoder, newest object first, and write each
page at its offset in ``OUT.tmp`` unless a newer object already did (so every page is written
once), skip transactions after the target, truncate to the target's database size, fsync, run
``PRAGMA integrity_check``, remove stale ``OUT-wal``/``OUT-shm`` and move the file into place,
then fsync the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import sqlite3
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

from replicad.checksum import file_checksum
from replicad.clients.base import ObjectInfo, ReplicaClient
from replicad.errors import FormatError, HistoryForkError, RestoreError
from replicad.format import (
    HEADER_SIZE,
    ObjectDecoder,
    PageEvent,
    TxnEndEvent,
    TxnInfo,
    decode_header,
    read_trailer,
)
from replicad.position import (
    NO_CHECKSUM,
    SEGMENT_PREFIX,
    SNAPSHOT_PREFIX,
    ObjectKind,
    ObjectName,
    parse_key,
)
from replicad.private import adopt_owner_and_mode, create_private_fd

#: Objects downloaded ahead of the one being applied.
DEFAULT_PREFETCH = 8
#: Bytes downloaded ahead at most; objects above `STREAM_ABOVE` are streamed, not held whole.
#: 16 MiB keeps two connections busy, more than decoding can use (64 MiB cost 60 MB of peak
#: RSS for no measurable gain).
PREFETCH_BYTES = 16 << 20
STREAM_ABOVE = 16 << 20
#: Chunks of a streamed object downloaded ahead of the decoder (at most 1 MiB each).
STREAM_QUEUE = 8
#: Bytes handed to the decoder at a time (its events for one chunk are held at once).
_FEED_BYTES = 1 << 20
#: `auto` (the default): none when the chain proves the result byte-equal to the source (the
#: check could only find a source that was already corrupt, at +60% restore time: measured in
#: `python -m bench.lineage`), the full check when it cannot (format v1 objects).
INTEGRITY_MODES = ("auto", "full", "quick", "none")
#: Most consecutive pages written with one system call.
_WRITE_RUN_PAGES = 256
#: Pages whose writes `_PageWriter` tracks (a bit each, twice: 16 MiB at most).
_TRACKED_PAGES = 1 << 26
#: Bitmap bytes `_PageWriter` lists for one object before it merges whole bitmaps instead.
_TOUCHED_MAX = 1 << 16
_MAX_TXID = 2**64 - 1
#: One more than the highest segment level (two decimal digits in a key).
_LEVELS = 100
#: A segment level's directory name, as `replicad.position.parse_key` reads it.
_LEVEL_DIR = re.compile(r"\d{2}")
#: The fraction of a second in an RFC 3339 time (after the seconds' two digits).
_FRACTION = re.compile(r"T\d{2}:\d{2}:\d{2}\.(\d+)")

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class RestorePlan:
    """The objects that rebuild the database as of `target_txid`, in the order to apply them.

    `verified`: every object records database checksums (format v2) and each continues the
    state the one before it left, so the result can be proven equal to the source.
    `warnings`: objects left out because they belong to another history (a stale branch).
    """

    snapshot: ObjectName
    segments: tuple[ObjectName, ...]
    target_txid: int
    sizes: tuple[int, ...]
    warnings: tuple[str, ...] = ()

    @property
    def objects(self) -> tuple[ObjectName, ...]:
        """Snapshot first, then segments."""
        return (self.snapshot, *self.segments)

    @property
    def total_bytes(self) -> int:
        """Bytes to download."""
        return sum(self.sizes)

    @property
    def verified(self) -> bool:
        """True when every object chains by checksum (see the class docstring)."""
        return all(n.chained for n in self.objects)


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
    #: The database checksum the restored file was proven to have (None: format v1, unproven).
    checksum: int | None = None
    warnings: tuple[str, ...] = ()


def names_from_listing(objects: Iterable[ObjectInfo]) -> dict[ObjectName, int]:
    """Our objects in a listing, with their sizes; foreign keys are left out."""
    out = {}
    for info in objects:
        name = parse_key(info.key)
        if name is not None:
            out[name] = info.size
    return out


def empty_replica_error() -> RestoreError:
    """What every command says about a replica that holds nothing of ours."""
    return RestoreError(
        "the replica holds no replicad objects",
        hint="check the replica URL and prefix; a replica gets its first snapshot when "
        "`replicad replicate` starts",
    )


# -- planning ---------------------------------------------------------------------------------
#
# A chain is a snapshot and segments, each starting at the TXID after the one before ends and,
# where both record database checksums (format v2), starting from the checksum the one before
# ended with.  Names carry the checksums, so the planner proves a chain from the listing alone
# and never splices two histories: objects of a stale branch (a second daemon, a lapsed lease)
# share TXIDs with the true history but not its checksums.  A v1 object records none and
# continues any state, unproven (`ObjectName.follows`).


def _state_after(name: ObjectName) -> int:
    """The database checksum after `name` (`NO_CHECKSUM` when a v1 name records none)."""
    return name.post if name.chained else NO_CHECKSUM


def plan_restore(names: dict[ObjectName, int], *, target_txid: int | None = None) -> RestorePlan:
    """Choose the objects that restore `target_txid` (default: the newest TXID). Pure.

    The newest snapshot from which a verified chain reaches the target is used; for the newest
    state, if no snapshot reaches the newest TXID listed (it is on a stale branch), the newest
    TXID that a chain does reach, with a warning naming what was left out.  Raises
    `RestoreError` when the replica is empty, the target is out of range, or no chain reaches
    it (a gap, or a fork: the message names the objects that disagree).
    """
    if not names:
        raise empty_replica_error()
    newest = max(n.last_txid for n in names)
    target = newest if target_txid is None else target_txid
    if target > newest:
        raise RestoreError(f"TXID {target} is newer than the replica's newest ({newest})")
    starts = _Segments(names)
    snapshots = _snapshots_before(names, target)
    first_error: RestoreError | None = None
    warnings: list[str] = []
    forked = _forked(names)
    for snapshot in snapshots:
        if forked:
            starts.prefer_live(snapshot.last_txid, _state_after(snapshot))
        try:
            segments = _chain(starts, snapshot.last_txid, target, _state_after(snapshot))
        except RestoreError as exc:
            first_error = first_error or exc
            warnings.append(f"snapshot {snapshot.key} does not reach TXID {target}: {exc.message}")
            continue
        return _plan(names, snapshot, segments, target, warnings if first_error else [])
    assert first_error is not None
    if target_txid is None and isinstance(first_error, HistoryForkError):
        return _newest_reachable(names, starts, snapshots, first_error)
    raise first_error


def _plan(
    names: dict[ObjectName, int],
    snapshot: ObjectName,
    segments: Sequence[ObjectName],
    target: int,
    warnings: Sequence[str],
) -> RestorePlan:
    chosen = (snapshot, *segments)
    return RestorePlan(
        snapshot, tuple(segments), target, tuple(names[n] for n in chosen), tuple(warnings)
    )


def _newest_reachable(
    names: dict[ObjectName, int],
    starts: _Segments,
    snapshots: Sequence[ObjectName],
    error: RestoreError | None,
) -> RestorePlan:
    """The newest state some chain reaches, when the newest TXID listed is on a stale branch."""
    best: tuple[int, ObjectName] | None = None
    for snapshot in snapshots:
        reachable = starts.reachable(snapshot.last_txid, _state_after(snapshot))
        reached = max(txid for txid, _ in reachable)
        if best is None or reached > best[0]:
            best = (reached, snapshot)
    if best is None:
        assert error is not None
        raise error
    target, snapshot = best
    if _forked(names):
        starts.prefer_live(snapshot.last_txid, _state_after(snapshot))
    segments = _chain(starts, snapshot.last_txid, target, _state_after(snapshot))
    beyond = sorted(n.key for n in names if n.last_txid > target)
    warning = (
        f"the newest verified state is TXID {target}; {len(beyond)} newer objects do not "
        f"continue its history and were left out (a stale branch?): {', '.join(beyond[:5])}"
    )
    return _plan(names, snapshot, segments, target, [warning])


def _snapshots_before(names: Iterable[ObjectName], target: int) -> list[ObjectName]:
    """Snapshots at or before `target`, newest first (of two at one TXID, the later taken)."""
    snapshots = sorted(
        (n for n in names if n.kind is ObjectKind.SNAPSHOT and n.last_txid <= target),
        reverse=True,
    )
    if not snapshots:
        raise RestoreError(
            f"no snapshot at or before TXID {target}",
            hint="the history before the oldest snapshot is no longer kept",
        )
    return snapshots


def _snapshot_for(names: Iterable[ObjectName], target: int) -> ObjectName:
    return _snapshots_before(names, target)[0]


class _Segments:
    """Segments by first TXID, and which of them continue a state.

    Where the history forks (`_forked`: two daemons wrote after the same state, or a stale
    branch shares its first TXIDs), both sides are verified histories; `prefer_live` then makes
    the planner choose, at each fork, the side that leads on to the newest state a chain
    reaches, so a restore to an older TXID lands on the history that went on.
    """

    def __init__(self, names: Iterable[ObjectName]) -> None:
        self.by_first: dict[int, list[ObjectName]] = {}
        for name in names:
            if name.kind is ObjectKind.SEGMENT:
                self.by_first.setdefault(name.first_txid, []).append(name)
        self._live: set[tuple[int, int]] | None = None

    def starting(self, txid: int) -> list[ObjectName]:
        """Every segment whose first TXID is `txid`, whatever state it continues."""
        return self.by_first.get(txid, [])

    def following(self, reached: int, checksum: int) -> list[ObjectName]:
        """The segments that continue the state (`reached`, `checksum`); only the live ones
        (see `prefer_live`) when some are.
        """
        found = [n for n in self.starting(reached + 1) if n.follows(checksum)]
        if self._live is None or len(found) < 2:
            return found
        live = [n for n in found if (n.last_txid, _state_after(n)) in self._live]
        return live or found

    def reachable(self, after: int, checksum: int) -> dict[tuple[int, int], set[tuple[int, int]]]:
        """Every state a chain from (`after`, `checksum`) reaches, with the states before it."""
        before: dict[tuple[int, int], set[tuple[int, int]]] = {(after, checksum): set()}
        frontier = [(after, checksum)]
        while frontier:
            state = frontier.pop()
            for step in self.following(*state):
                end = (step.last_txid, _state_after(step))
                if end not in before:
                    before[end] = set()
                    frontier.append(end)
                before[end].add(state)
        return before

    def prefer_live(self, after: int, checksum: int) -> None:
        """Mark the states on a chain from (`after`, `checksum`) to the newest state reachable
        from it: at a fork, `following` then returns the side that goes on.
        """
        self._live = None
        before = self.reachable(after, checksum)
        newest = max(txid for txid, _ in before)
        live = {state for state in before if state[0] == newest}
        frontier = list(live)
        while frontier:
            for earlier in before[frontier.pop()]:
                if earlier not in live:
                    live.add(earlier)
                    frontier.append(earlier)
        self._live = live


def _furthest(candidates: Iterable[ObjectName], target: int | None) -> ObjectName | None:
    """The segment reaching furthest without passing `target`, or None.

    Ties go to the higher level (then the later commit times), whatever the order of the
    listing: the bounded planner (`make_plan`) lists lower levels only where the higher ones
    stop, so this is the rule that lets it choose exactly what a full listing would.
    """
    within = [n for n in candidates if target is None or n.last_txid <= target]
    return max(within) if within else None


def _chain(
    starts: _Segments, after: int, target: int, checksum: int = NO_CHECKSUM
) -> list[ObjectName]:
    """Segments from `after + 1` up to `target` continuing the state with `checksum`: at each
    step the one reaching furthest without passing the target, else the one that contains it
    (applied partly).

    Where that greedy walk meets a dead end (a segment whose successor is missing while
    another segment with the same start goes on: a retried upload once left such a pair, and
    a stale branch's objects look alike), a breadth-first search over (TXID, checksum) states
    finds the chain with the fewest objects, if there is one.
    """
    try:
        return _greedy_chain(starts, after, target, checksum)
    except _Gap as gap:
        chain = _search_chain(starts, after, target, checksum)
        if chain is None:
            raise gap.error(starts) from None
        return chain


class _Gap(Exception):
    """No segment continues the state (`reached`, `checksum`)."""

    def __init__(self, reached: int, checksum: int) -> None:
        super().__init__(reached)
        self.reached = reached
        self.checksum = checksum

    def error(self, starts: _Segments) -> RestoreError:
        others = starts.starting(self.reached + 1)
        if others:
            keys = ", ".join(n.key for n in others[:5])
            return HistoryForkError(
                f"the history forks after TXID {self.reached}: no object continues its verified "
                f"state (checksum {self.checksum:016x}); these start there but belong to "
                f"another history: {keys}",
                hint=f"the newest verified state on this path is TXID {self.reached}: restore it "
                f"with --txid {self.reached}, and check which daemon wrote the others "
                "(`replicad ls`, `replicad verify`)",
            )
        return RestoreError(
            f"the history has a gap: no segment starts at TXID {self.reached + 1}",
            hint=f"the newest state before the gap is TXID {self.reached}: "
            f"restore it with --txid {self.reached}",
        )


def _greedy_steps(
    starts: _Segments, after: int, target: int | None, checksum: int
) -> Iterator[ObjectName]:
    """From `after`, the segments reaching furthest without passing `target`, in turn, until
    none continues where the last one ended.
    """
    reached = after
    while target is None or reached < target:
        step = _furthest(starts.following(reached, checksum), target)
        if step is None:
            return
        yield step
        reached, checksum = step.last_txid, _state_after(step)


def _greedy_chain(starts: _Segments, after: int, target: int, checksum: int) -> list[ObjectName]:
    chain = list(_greedy_steps(starts, after, target, checksum))
    reached = chain[-1].last_txid if chain else after
    if chain:
        checksum = _state_after(chain[-1])
    if reached < target:  # nothing fits within the target: one that contains it, or a gap
        candidates = starts.following(reached, checksum)
        if not candidates:
            raise _Gap(reached, checksum)
        step = min(candidates, key=lambda n: (n.level, n))
        if step.last_txid > target and step.level > 0:
            # A compacted segment carries its pages on its last transaction only: applying it
            # partly would be wrong. Level-0 segments are what make single TXIDs restorable.
            raise RestoreError(
                f"TXID {target} is inside compacted segment {step.key} and the level-0 "
                "segments for it are gone",
                hint=f"restore TXID {reached} or {step.last_txid} instead",
            )
        chain.append(step)
    return chain


def _search_chain(
    starts: _Segments, after: int, target: int, checksum: int
) -> list[ObjectName] | None:
    """The chain with the fewest objects from `after + 1` to `target`, or None."""
    begin = (after, checksum)
    came_from: dict[tuple[int, int], tuple[tuple[int, int], ObjectName] | None] = {begin: None}
    frontier = [begin]
    while frontier:
        following = []
        for state in frontier:
            for step in starts.following(*state):
                if step.last_txid > target and step.level > 0:
                    continue  # cannot be applied partly
                end = (min(step.last_txid, target), _state_after(step))
                if step.last_txid > target:
                    end = (target, NO_CHECKSUM)  # applied partly: checked from its trailer
                if end not in came_from:
                    came_from[end] = (state, step)
                    following.append(end)
        done = next((s for s in came_from if s[0] == target), None)
        if done is not None:
            chain = []
            node = came_from[done]
            while node is not None:
                chain.append(node[1])
                node = came_from[node[0]]
            return chain[::-1]
        frontier = following
    return None


def parse_timestamp(text: str) -> int:
    """An RFC 3339 timestamp (any time zone) as Unix nanoseconds; RestoreError if malformed.

    Fractions of a second keep up to nine digits (`replicad log` prints nanoseconds).
    """
    nanos = 0
    if match := _FRACTION.search(text):
        digits = match[1]
        nanos = int(digits[:9].ljust(9, "0")) % 1000  # datetime keeps the microseconds
        text = text[: match.start(1)] + digits[:6] + text[match.end(1) :]
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
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000 + nanos


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
    integrity: str = "auto",
    prefetch: int = DEFAULT_PREFETCH,
) -> RestoreResult:
    """Restore the replica's database as of `target_txid` (default: newest) to `output`.

    Raises `RestoreError` for a target that exists (without `force`), an empty replica, a gap,
    a failed integrity check; `FormatError` for a corrupt object; `ReplicaError` for storage.
    """
    started = time.monotonic()
    output, tmp = await asyncio.to_thread(_prepare_target, output, force)
    plan = await make_plan(client, target_txid=target_txid, at_ns=at_ns)
    for warning in plan.warnings:
        log.warning(warning)
    try:
        applied = await _apply(client, plan, tmp, prefetch)
        await asyncio.to_thread(_check_size, tmp, applied)
        checksum = await asyncio.to_thread(_prove, tmp, plan, applied)
        if integrity == "auto":
            integrity = "none" if checksum is not None else "full"
        await asyncio.to_thread(_check_integrity, tmp, integrity)
        await asyncio.to_thread(_move_into_place, tmp, output, force)
    except BaseException:
        _remove_quietly(tmp, _sidecar(tmp, "-wal"), _sidecar(tmp, "-shm"))
        raise
    return RestoreResult(
        output,
        plan.target_txid,
        applied.page_size,
        applied.db_pages,
        len(plan.objects),
        plan.total_bytes,
        time.monotonic() - started,
        checksum,
        plan.warnings,
    )


@dataclass(frozen=True, slots=True)
class _Applied:
    """What applying a plan wrote, and the checksum the result must have (None: unrecorded)."""

    page_size: int
    db_pages: int
    expected: int | None


def _check_size(tmp: Path, applied: _Applied) -> None:
    """The database size the objects claim must be the one the restored header records, so a
    corrupt or crafted size cannot make a huge sparse file pass (SQLite header bytes 28-31).
    """
    with tmp.open("rb") as f:
        header = f.read(100)
    in_header = int.from_bytes(header[28:32], "big")
    valid = len(header) == 100 and in_header and header[24:28] == header[92:96]
    if valid and in_header != applied.db_pages:
        raise RestoreError(
            f"the objects say the database has {applied.db_pages} pages, but its own header "
            f"says {in_header}",
            hint="the replica is damaged or was written by something else; try an earlier "
            "--txid or another replica",
        )


def _prove(tmp: Path, plan: RestorePlan, applied: _Applied) -> int | None:
    """Check the restored file's database checksum against the one the chain ends with: the
    file is then the source's state at the target TXID, byte for byte.  None when the plan
    holds v1 objects, which record no checksums (logged: such a restore is unproven).
    """
    if not plan.verified or applied.expected is None:
        log.warning(
            "the replica holds format v1 objects, which record no database checksums: this "
            "restore cannot be proven equal to the source; only the integrity check vouches "
            "for it"
        )
        return None
    actual = file_checksum(tmp, applied.page_size, applied.db_pages)
    if actual != applied.expected:
        raise RestoreError(
            f"the restored database's checksum {actual:016x} is not {applied.expected:016x}, "
            f"the source's at TXID {plan.target_txid}: the objects "
            f"{plan.objects[0].key}..{plan.objects[-1].key} do not add up to that state",
            hint="the replica is damaged, or two histories were written to it; run `replicad "
            "verify` on it, and restore an earlier --txid or another replica",
        )
    return actual


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
            raise _root_cause(group) from None
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


def _forked(names: Iterable[ObjectName]) -> bool:
    """Whether two chained segments start or end at one TXID in different states."""
    seen: dict[tuple[str, int], int] = {}
    for name in names:
        if name.kind is ObjectKind.SEGMENT and name.chained:
            for key, checksum in (
                (("pre", name.first_txid), name.pre),
                (("post", name.last_txid), name.post),
            ):
                if seen.setdefault(key, checksum) != checksum:
                    return True
    return False


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


async def _apply(client: ReplicaClient, plan: RestorePlan, tmp: Path, prefetch: int) -> _Applied:
    try:
        fd = create_private_fd(tmp)
    except OSError as exc:
        raise RestoreError(f"cannot create {tmp}: {exc.strerror}") from exc
    writer = _PageWriter(fd, plan.target_txid, newest_first=True)
    try:
        try:
            expected = await _apply_objects(client, plan, writer, prefetch)
        except _UntrackedPage:
            # A database of hundreds of GB: rather than track more pages, start again oldest
            # first, writing every version of every page.
            os.ftruncate(fd, 0)
            writer = _PageWriter(fd, plan.target_txid, newest_first=False)
            expected = await _apply_objects(client, plan, writer, prefetch)
        writer.finish()
        await asyncio.to_thread(os.fsync, fd)
    except OSError as exc:
        raise RestoreError(
            f"cannot write {tmp}: {exc.strerror}",
            hint="free space on that filesystem (the result needs about the database's size), "
            "or restore to another directory",
        ) from exc
    finally:
        os.close(fd)
    return _Applied(writer.page_size, writer.db_pages, expected)


async def _apply_objects(
    client: ReplicaClient, plan: RestorePlan, writer: _PageWriter, prefetch: int
) -> int | None:
    """Apply the plan's objects in `writer`'s order, each chunk as it arrives; returns the
    database checksum the last object records for the target TXID (None: unrecorded).

    Decoding runs in the event loop, between downloads.  A worker thread for it was tried: on
    two busy cores it was slower, as decoding is mostly Python and holds the GIL.
    """
    order = plan.objects[::-1] if writer.newest_first else plan.objects
    sizes = dict(zip(plan.objects, plan.sizes, strict=True))
    expected = None
    try:
        async with asyncio.TaskGroup() as tg:
            downloads = _Downloads(client, order, sizes, prefetch, tg)
            for name in order:
                decoder = ObjectDecoder(expected=name)
                with _naming(client, name):
                    async for chunk in downloads.chunks(name):
                        writer.feed(decoder, chunk)
                    writer.end_object(decoder)
                if name is plan.objects[-1] and decoder.index is not None:
                    expected = decoder.index.checksum_after(plan.target_txid)
        return expected
    except BaseExceptionGroup as group:
        # One root cause ends a restore; report it as itself, not as a group of one.
        raise _root_cause(group) from None


def _root_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _root_cause(first) if isinstance(first, BaseExceptionGroup) else first


class _Downloads:
    """Downloads the objects to apply ahead of the one being applied, in bounded memory.

    Objects up to `STREAM_ABOVE` are fetched whole, at most `ahead` objects and
    `PREFETCH_BYTES` at a time.  A larger one (a snapshot, a compacted level) is streamed
    through a queue of `STREAM_QUEUE` chunks.  One stream downloads at a time, in order: the
    next starts as soon as the one before has all its bytes, so a new request's latency hides
    behind decoding what is queued.  A stream waits for its reader at most as long as decoding
    the objects before it takes (at most `PREFETCH_BYTES` and a queue), well within the time
    servers give a connection left idle.
    """

    def __init__(
        self,
        client: ReplicaClient,
        order: Sequence[ObjectName],
        sizes: dict[ObjectName, int],
        ahead: int,
        tg: asyncio.TaskGroup,
    ) -> None:
        self._client = client
        self._sizes = sizes
        self._ahead = max(1, ahead)
        self._tg = tg
        self._pending = deque(order)
        #: Objects in the window, in order: a whole download, or a stream.
        self._window: dict[ObjectName, asyncio.Task[bytearray] | _Stream] = {}
        self._in_flight = 0
        self._unstarted: deque[_Stream] = deque()  # streams in the window, not started yet
        self._streaming = False  # a stream is downloading

    async def chunks(self, name: ObjectName) -> AsyncIterator[bytes | memoryview]:
        """The bytes of `name`, the next object in order, in chunks of at most 1 MiB."""
        self._fill()
        fetch = self._window.pop(name)
        if isinstance(fetch, _Stream):
            self._fill()
            if fetch.pump is None:  # the first stream (those before it have all been read)
                self._unstarted.remove(fetch)
                self._begin(fetch)
            async for chunk in self._read(fetch):
                yield chunk
            return
        data = memoryview(await fetch)
        self._in_flight -= self._sizes[name]
        self._fill()
        for start in range(0, len(data), _FEED_BYTES):
            yield data[start : start + _FEED_BYTES]

    def _fill(self) -> None:
        while self._pending and len(self._window) < self._ahead:
            name = self._pending[0]
            size = self._sizes[name]
            if size > STREAM_ABOVE:
                self._unstarted.append(_Stream(name))
                self._window[self._pending.popleft()] = self._unstarted[-1]
                self._next_stream()
                continue
            if self._window and self._in_flight + size > PREFETCH_BYTES:
                return
            self._window[self._pending.popleft()] = self._tg.create_task(self._whole(name))
            self._in_flight += size

    async def _whole(self, name: ObjectName) -> bytearray:
        # Appended chunk by chunk: joining a list of chunks would briefly hold the object twice.
        data = bytearray()
        async for chunk in self._client.iter_object(name.key):
            data += chunk
        return data

    def _next_stream(self) -> None:
        if self._unstarted and not self._streaming:
            self._begin(self._unstarted.popleft())

    def _begin(self, stream: _Stream) -> None:
        self._streaming = True
        stream.pump = self._tg.create_task(self._pump(stream))

    async def _pump(self, stream: _Stream) -> None:
        chunks = self._client.iter_object(stream.name.key)
        try:
            async for chunk in chunks:
                await stream.queue.put(chunk)
        finally:
            self._streaming = False
            if isinstance(chunks, AsyncGenerator):
                await chunks.aclose()  # releases the connection at once if cancelled
        self._next_stream()
        await stream.queue.put(None)

    @staticmethod
    async def _read(stream: _Stream) -> AsyncIterator[bytes]:
        try:
            while (chunk := await stream.queue.get()) is not None:
                yield chunk
        finally:
            if stream.pump is not None:
                stream.pump.cancel()  # when the reader stops early, so does the download


@dataclass(eq=False, slots=True)
class _Stream:
    """An object downloaded into a bounded queue by a task of its own (`pump`)."""

    name: ObjectName
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(STREAM_QUEUE))
    pump: asyncio.Task[None] | None = None


@contextlib.contextmanager
def _naming(client: ReplicaClient, name: ObjectName) -> Iterator[None]:
    """Say which object was bad (the partial OUT.tmp is removed: no page reaches OUT)."""
    try:
        yield
    except FormatError as exc:
        raise FormatError(
            f"{name.key} in {client.url} is damaged: {exc.message}",
            hint=f"restore an earlier point (--txid {name.first_txid - 1}) or another replica; "
            "keep the damaged object for investigation",
        ) from exc


class _PageWriter:
    """Writes the pages of objects applied newest first: each page's newest version, once.

    A page already written by a newer object is skipped, so a page is written once rather than
    once per object holding a version of it (an hour of history rewrites most pages several
    times; they are still decoded, so every object is verified whole).  Within one object a
    later version replaces an earlier one: its pages join `_done` only when it ends.  One bit
    per page, for the first `_TRACKED_PAGES` pages, keeps memory bounded whatever the
    database's size (a page beyond raises `_UntrackedPage`: the caller starts again oldest first
    with `newest_first` off, writing every version), and an object costs time for its own
    pages, not the database's (a plan can hold thousands of small segments).

    Runs of consecutive pages (a snapshot's) go out in one `pwritev`: one system call per page
    made restores of 4 KiB pages twice as slow.
    """

    def __init__(self, fd: int, target: int, *, newest_first: bool) -> None:
        self.fd = fd
        self.target = target
        self.newest_first = newest_first
        self._tracked = _TRACKED_PAGES if newest_first else 0
        self.page_size = 0
        self.db_pages = 0
        self._txid = 0  # the newest transaction seen, whose database size the result takes
        self._done = bytearray()  # a bit per page written by an object that has ended
        self._mine = bytearray()  # the same for the object being applied; zeros between objects
        self._touched: list[int] = []  # the bytes of `_mine` that are not zero, while few
        self._many = False  # too many to list: the whole of `_mine` is merged
        self._run_start = 0
        self._run: list[bytes] = []

    def feed(self, decoder: ObjectDecoder, chunk: bytes | memoryview) -> None:
        """Decode the next chunk of an object and write its pages."""
        events = decoder.feed(chunk)
        if decoder.header is not None:
            self._check_page_size(decoder.header.page_size)
        target, tracked, done, mine = self.target, self._tracked, self._done, self._mine
        touch = _ignore if self._many else self._touched.append
        for event in events:
            if type(event) is PageEvent:  # the hot loop: about one event per page
                pgno = event.pgno
                if event.txid > target:
                    continue
                if pgno < tracked:
                    byte, bit = pgno >> 3, 1 << (pgno & 7)
                    if byte < len(done) and done[byte] & bit:
                        continue  # a newer object wrote this page
                    if byte >= len(mine):
                        mine.extend(bytes(byte + 1 - len(mine) + 4096))
                    if not mine[byte]:
                        touch(byte)
                    mine[byte] |= bit
                elif self.newest_first:
                    raise _UntrackedPage(pgno)
                self._write(pgno, event.data)
            elif type(event) is TxnEndEvent and self._txid < event.info.txid <= target:
                self._txid, self.db_pages = event.info.txid, event.info.db_pages
        if len(self._touched) > _TOUCHED_MAX:  # checked per chunk: a chunk's pages more at most
            self._many = True
            self._touched.clear()

    def end_object(self, decoder: ObjectDecoder) -> None:
        """The object has ended: check it was whole, and mark its pages written."""
        decoder.close()
        mine, done = self._mine, self._done
        if len(done) < len(mine):
            done.extend(bytes(len(mine) - len(done)))
        if self._many:
            size = len(mine)
            either = int.from_bytes(done[:size], "little") | int.from_bytes(mine, "little")
            done[:size] = either.to_bytes(size, "little")
            mine[:] = bytes(size)
        else:
            for byte in self._touched:
                done[byte] |= mine[byte]
                mine[byte] = 0
        self._touched.clear()
        self._many = False

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
        """Write what is pending and cut the file to the target's size (the caller fsyncs)."""
        self._flush()
        os.ftruncate(self.fd, self.db_pages * self.page_size)


class _UntrackedPage(Exception):
    """A page number beyond `_TRACKED_PAGES`, met while applying newest first."""


def _ignore(_: int) -> None:
    """Takes an argument and does nothing: `_PageWriter`'s `touch` when it stopped listing."""


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
        if output.exists():
            adopt_owner_and_mode(tmp, output)
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
