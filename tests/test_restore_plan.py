"""The restore planner: newest snapshot at or before the target, then a gap-free chain; and
the bounded planner (`make_plan`), which must choose what it would from a full listing.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Awaitable
from typing import cast

import pytest

from replicad.clients.base import ClientStats, ObjectInfo, ReplicaClient, keys_between
from replicad.compaction import plan_compaction
from replicad.errors import RestoreError
from replicad.format import ObjectHeader, Transaction, TxnInfo, encode_object
from replicad.position import ObjectName, segment_name, snapshot_name
from replicad.restore import RestorePlan, make_plan, plan_restore, txid_at
from replicad.restore.listing import landing_at


def seg(first: int, last: int, level: int = 0) -> ObjectName:
    return segment_name(level=level, first_txid=first, last_txid=last, min_time_ms=0, max_time_ms=0)


def plan(names: list[ObjectName], target: int | None = None) -> list[str]:
    p = plan_restore(dict.fromkeys(names, 1), target_txid=target)
    return [
        f"{'S' if n.kind.value == 'snapshot' else 'L' + str(n.level)}{n.first_txid}-{n.last_txid}"
        for n in p.objects
    ]


def test_latest_uses_newest_snapshot_and_following_segments() -> None:
    names = [snapshot_name(1, 0), seg(2, 5), seg(6, 9), snapshot_name(7, 0), seg(8, 9), seg(10, 12)]
    assert plan(names) == ["S7-7", "L08-9", "L010-12"]


def test_target_inside_a_segment_is_applied_partly() -> None:
    names = [snapshot_name(1, 0), seg(2, 5), seg(6, 9)]
    p = plan_restore(dict.fromkeys(names, 1), target_txid=7)
    assert p.target_txid == 7
    assert [n.last_txid for n in p.objects] == [1, 5, 9]


def test_higher_levels_are_preferred_when_they_fit() -> None:
    names = [snapshot_name(1, 0), seg(2, 3), seg(4, 5), seg(2, 5, level=1), seg(6, 6)]
    assert plan(names) == ["S1-1", "L12-5", "L06-6"]
    assert plan(names, target=3) == ["S1-1", "L02-3"]


def test_gap_is_an_error_naming_the_last_good_txid() -> None:
    names = [snapshot_name(1, 0), seg(2, 5), seg(8, 9)]
    with pytest.raises(RestoreError, match="no segment starts at TXID 6") as info:
        plan_restore(dict.fromkeys(names, 1))
    assert "--txid 5" in (info.value.hint or "")
    assert plan(names, target=5) == ["S1-1", "L02-5"]


def test_dead_end_beside_a_longer_segment_is_routed_around() -> None:
    """A retried upload once left 6-10 beside 6-20 (crash soak, seed 897481133): the furthest
    segment within a target of 15 is 6-10, and nothing starts at 11.
    """
    names = [snapshot_name(1, 0), seg(2, 5), seg(6, 10), seg(6, 20), seg(21, 30)]
    assert plan(names, target=15) == ["S1-1", "L02-5", "L06-20"]
    assert plan(names, target=8) == ["S1-1", "L02-5", "L06-10"]
    assert plan(names, target=25) == ["S1-1", "L02-5", "L06-20", "L021-30"]
    # A compacted segment is never applied partly, even to get around a dead end.
    compacted = [snapshot_name(1, 0), seg(2, 5), seg(6, 10), seg(6, 20, level=1)]
    with pytest.raises(RestoreError, match="no segment starts at TXID 11"):
        plan_restore(dict.fromkeys(compacted, 1), target_txid=15)


def test_empty_replica_and_out_of_range_targets() -> None:
    with pytest.raises(RestoreError, match="no replicad objects"):
        plan_restore({})
    names = [snapshot_name(5, 0), seg(6, 8)]
    with pytest.raises(RestoreError, match="newer than"):
        plan_restore(dict.fromkeys(names, 1), target_txid=9)
    with pytest.raises(RestoreError, match="no snapshot at or before TXID 3"):
        plan_restore(dict.fromkeys(names, 1), target_txid=3)


def test_compacted_segment_is_never_applied_partly() -> None:
    names = [snapshot_name(1, 0), seg(2, 9, level=1)]
    with pytest.raises(RestoreError, match="inside compacted segment"):
        plan_restore(dict.fromkeys(names, 1), target_txid=5)
    assert plan(names, target=9) == ["S1-1", "L12-9"]


def test_ties_go_to_the_higher_level_whatever_the_order() -> None:
    names = [snapshot_name(1, 0), seg(2, 5, level=1), seg(2, 5), seg(6, 6)]
    assert plan(names) == plan(names[::-1]) == ["S1-1", "L12-5", "L06-6"]


# -- the bounded planner (`make_plan`) against `plan_restore` over the full listing ----------
#
# Random histories: level-0 segments with commit times that mostly move on and sometimes step
# back, lost uploads (TXID gaps, each followed by a snapshot as after a continuity loss),
# snapshots on segment boundaries, then the real compaction planner run to the end, cutting
# jobs into pieces as `compact` does when a merge outgrows its memory.


class MemoryReplica:
    """A replica in memory with what planning uses: bounded listings, levels, GETs."""

    def __init__(self, sizes: dict[ObjectName, int], level0: dict[ObjectName, bytes]) -> None:
        self.sizes = {name.key: size for name, size in sizes.items()}
        self.level0 = {name.key: data for name, data in level0.items()}
        self.url = "memory://replica"
        self.stats = ClientStats()
        self.keys_listed = 0

    async def list_objects(
        self, prefix: str = "", *, start_after: str | None = None, end_before: str | None = None
    ) -> list[ObjectInfo]:
        self.stats.count("LIST")
        found = [ObjectInfo(k, s) for k, s in self.sizes.items() if k.startswith(prefix)]
        found = keys_between(found, start_after, end_before)
        self.keys_listed += len(found)
        return found

    async def list_dirs(self, prefix: str = "") -> list[str]:
        self.stats.count("LIST")
        rests = [k[len(prefix) :] for k in self.sizes if k.startswith(prefix)]
        return sorted({rest.split("/")[0] for rest in rests if "/" in rest})

    async def get_object(self, key: str) -> bytes:
        self.stats.count("GET")
        return self.level0[key]

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        self.stats.count("GET")
        return self.level0[key][start : start + length]


def _segment_object(name: ObjectName, times: list[int]) -> bytes:
    """A segment (or, for a snapshot's name, a snapshot) of one 512-byte page per TXID."""
    header = ObjectHeader(
        kind=name.kind,
        page_size=512,
        level=0,
        first_txid=name.first_txid,
        last_txid=name.last_txid,
        min_time_ns=times[0],
        max_time_ns=times[-1],
        db_pages=1,
        position=None,
    )
    txns = [
        Transaction(TxnInfo(txid, t, 1, 1), [(1, bytes(512))])
        for txid, t in zip(range(name.first_txid, name.last_txid + 1), times, strict=True)
    ]
    return encode_object(header, txns)


def random_history(
    rng: random.Random, transactions: int, lost: float = 0.02
) -> tuple[dict[ObjectName, int], dict[ObjectName, bytes], list[int]]:
    """Snapshots and level-0 segments (with their bytes); the commit times (ns) of all TXIDs."""
    now_ns = 1_700_000_000_000 * 1_000_000
    names: dict[ObjectName, int] = {}
    level0: dict[ObjectName, bytes] = {}

    def add_snapshot(txid: int, taken_ms: int) -> None:
        name = snapshot_name(txid, taken_ms)
        level0[name] = _segment_object(name, [commit_times[txid - 1]])
        names[name] = len(level0[name])

    txid, commit_times = 1, [now_ns]
    add_snapshot(1, now_ns // 1_000_000)
    while txid < transactions:
        if rng.random() < 0.03:  # the clock steps back (between uploads)
            now_ns -= rng.randint(1, 90_000) * 1_000_000
        times = []
        for _ in range(rng.randint(1, 8)):
            now_ns += rng.choice([0, 1, 3, 700, 2_000, 9_000, 31_000]) * 1_000_000
            times.append(now_ns)
        name = segment_name(
            level=0,
            first_txid=txid + 1,
            last_txid=txid + len(times),
            min_time_ms=times[0] // 1_000_000,
            max_time_ms=times[-1] // 1_000_000,
        )
        txid += len(times)
        commit_times += times
        if rng.random() < lost:  # a lost upload: a gap, and a snapshot once replication resumes
            add_snapshot(txid, now_ns // 1_000_000 + 500)
            continue
        level0[name] = _segment_object(name, times)
        names[name] = len(level0[name])
        if rng.random() < 0.04:
            add_snapshot(txid, now_ns // 1_000_000 + rng.randint(0, 5000))
    return names, level0, commit_times


def compact_names(
    rng: random.Random, names: dict[ObjectName, int], levels: tuple[float, ...]
) -> None:
    """Add the segments compaction would write, until it plans nothing more."""
    now_ms = max(n.max_time_ms for n in names) + 10**9
    while jobs := plan_compaction(names, levels=levels, now_ms=now_ms, settle_ms=0):
        for job in jobs:
            sources = list(job.sources)
            while sources:  # cut between sources, as a merge that outgrows its memory is
                piece = sources[: rng.randint(1, len(sources))] if rng.random() < 0.3 else sources
                sources = sources[len(piece) :]
                merged = segment_name(
                    level=job.level,
                    first_txid=piece[0].first_txid,
                    last_txid=piece[-1].last_txid,
                    min_time_ms=piece[0].min_time_ms,
                    max_time_ms=piece[-1].max_time_ms,
                )
                names[merged] = sum(names[s] for s in piece) // 2 + 1


async def outcome(coroutine: Awaitable[RestorePlan]) -> RestorePlan | str:
    try:
        return await coroutine
    except RestoreError as exc:
        return f"RestoreError: {exc.message}"


async def full_plan(
    client: MemoryReplica, names: dict[ObjectName, int], target: int | None, at_ns: int | None
) -> RestorePlan:
    landing = None
    if at_ns is not None:
        landing = await landing_at(cast(ReplicaClient, client), names, at_ns)
        assert landing.txid == await txid_at(cast(ReplicaClient, client), names, at_ns)
        target = landing.txid
    return dataclasses.replace(plan_restore(names, target_txid=target), landing=landing)


@pytest.mark.parametrize("seed", range(60))
async def test_bounded_plan_is_the_full_listings_plan(seed: int) -> None:
    rng = random.Random(seed)
    lost = rng.choice([0.0, 0.005, 0.02])
    names, level0, commit_times = random_history(rng, rng.choice([60, 400, 1500]), lost)
    compact_names(rng, names, rng.choice([(30.0, 300.0, 3600.0), (2.0, 10.0, 60.0), (5.0, 60.0)]))
    client = MemoryReplica(names, level0)
    newest = len(commit_times)
    targets: list[tuple[int | None, int | None]] = [(None, None)]
    targets += [(rng.randint(1, newest + 1), None) for _ in range(6)]
    for _ in range(6):
        moment = rng.choice(commit_times) + rng.choice([-1, 0, 1, 50_000_000, 700_000_000])
        targets.append((None, moment))
    for target, at_ns in targets:
        bounded = await outcome(
            make_plan(cast(ReplicaClient, client), target_txid=target, at_ns=at_ns)
        )
        expected = await outcome(full_plan(client, names, target, at_ns))
        assert bounded == expected, (target, at_ns)


async def test_bounded_plan_lists_a_fraction_of_a_long_history() -> None:
    rng = random.Random(7)
    names, level0, _ = random_history(rng, 20_000)
    compact_names(rng, names, (30.0, 300.0, 3600.0))
    client = MemoryReplica(names, level0)
    plan = await make_plan(cast(ReplicaClient, client))
    assert plan == plan_restore(names)
    assert client.keys_listed < len(names) // 10
    assert client.stats.requests["LIST"] <= 2 + 4  # snapshots, levels, then once per level


@pytest.mark.parametrize("seed", range(200))
async def test_bounded_plan_on_arbitrary_replicas_is_a_valid_chain(seed: int) -> None:
    """Random names with no structure: where the plans differ, the bounded one still goes
    from the same snapshot to the same target through a gap-free chain of real segments.
    """
    rng = random.Random(seed)
    top = rng.randint(5, 60)
    names: dict[ObjectName, int] = {}
    for _ in range(rng.randint(1, 4)):
        names[snapshot_name(rng.randint(1, top), rng.randint(0, 10))] = 1
    for _ in range(rng.randint(0, 80)):
        first = rng.randint(1, top)
        level = rng.choice([0, 0, 0, 1, 1, 2, 7])
        names[seg(first, first + rng.randint(0, 12), level)] = 1
    client = MemoryReplica(names, {})
    for target in [rng.randint(1, top + 12) for _ in range(5)]:
        bounded = await outcome(make_plan(cast(ReplicaClient, client), target_txid=target))
        expected = await outcome(full_plan(client, names, target, None))
        if bounded == expected:
            continue
        assert isinstance(bounded, RestorePlan), (bounded, expected)
        assert bounded.target_txid == target
        if isinstance(expected, RestorePlan):
            assert bounded.snapshot == expected.snapshot
        reached = bounded.snapshot.last_txid
        for step in bounded.segments:
            assert step in names
            assert step.first_txid == reached + 1
            assert step.last_txid <= target or (step.level == 0 and step is bounded.segments[-1])
            reached = step.last_txid
        assert reached >= target
