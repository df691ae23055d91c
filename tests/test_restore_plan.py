"""The restore planner: newest snapshot at or before the target, then a gap-free chain."""

from __future__ import annotations

import pytest

from replicad.errors import RestoreError
from replicad.position import ObjectName, segment_name, snapshot_name
from replicad.restore import plan_restore


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
