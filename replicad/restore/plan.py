"""The restore plan, pure: which objects rebuild the database at a TXID.

The newest snapshot at or before the target, then the chain of segments that starts right
after it and reaches the target.  A gap in that chain is an error naming the last TXID that can
be restored, never a silently older database.  No I/O here: `replicad.restore.listing` lists
what a plan needs and calls `plan_restore`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from replicad.clients.base import ObjectInfo
from replicad.errors import HistoryForkError, RestoreError
from replicad.position import NO_CHECKSUM, ObjectKind, ObjectName, parse_key

#: The fraction of a second in an RFC 3339 time (after the seconds' two digits).
_FRACTION = re.compile(r"T\d{2}:\d{2}:\d{2}\.(\d+)")


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
    #: For a restore to a moment: where it lands (see `Landing`).
    landing: Landing | None = None

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
class Landing:
    """Where a restore to a moment lands: the newest state committed at or before `target_ns`,
    and the state after it (None: none is kept).  Commit times are as the daemon observed them
    (to the millisecond where only a key records them).
    """

    target_ns: int
    txid: int
    commit_ns: int
    next_txid: int | None = None
    next_commit_ns: int | None = None

    @property
    def shortfall_ns(self) -> int:
        """How long before the moment the restored state was committed."""
        return max(0, self.target_ns - self.commit_ns)


def names_from_listing(objects: Iterable[ObjectInfo]) -> dict[ObjectName, int]:
    """Our objects in a listing, with their sizes; foreign keys are left out."""
    out = {}
    for info in objects:
        name = parse_key(info.key)
        if name is not None:
            out[name] = info.size
    return out


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


def empty_replica_error() -> RestoreError:
    """What every command says about a replica that holds nothing of ours."""
    return RestoreError(
        "the replica holds no replicad objects",
        hint="check the replica URL and prefix; a replica gets its first snapshot when "
        "`replicad replicate` starts",
    )


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
