"""Object names: keys round-trip and sort in TXID order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from replicad.position import ObjectKind, parse_key, segment_name, snapshot_name

txids = st.integers(min_value=1, max_value=2**64 - 1)
times = st.integers(min_value=0, max_value=10**13 - 1)


@given(txids, times)
def test_snapshot_key_round_trip(txid: int, ms: int) -> None:
    name = snapshot_name(txid, ms)
    assert parse_key(name.key) == name


@given(st.integers(0, 99), txids, st.integers(0, 1000), times, times)
def test_segment_key_round_trip(level: int, first: int, span: int, t1: int, t2: int) -> None:
    last = min(first + span, 2**64 - 1)
    name = segment_name(
        level=level,
        first_txid=first,
        last_txid=last,
        min_time_ms=min(t1, t2),
        max_time_ms=max(t1, t2),
    )
    assert parse_key(name.key) == name
    assert name.kind is ObjectKind.SEGMENT


@given(st.lists(st.tuples(txids, times), min_size=2, max_size=20))
def test_keys_sort_like_txids(items: list[tuple[int, int]]) -> None:
    names = [
        segment_name(level=0, first_txid=t, last_txid=t, min_time_ms=m, max_time_ms=m)
        for t, m in items
    ]
    by_key = sorted(names, key=lambda n: n.key)
    assert [n.first_txid for n in by_key] == sorted(n.first_txid for n in names)


def test_foreign_keys_are_not_ours() -> None:
    for key in [
        "",
        "README",
        "snapshots/xyz.snap",
        "segments/0/1-2.seg",
        "snapshots/00000000000000ff-1.snap",
    ]:
        assert parse_key(key) is None


def test_names_of_both_kinds_sort_together() -> None:
    names = [
        snapshot_name(10, 5),
        segment_name(level=0, first_txid=10, last_txid=10, min_time_ms=5, max_time_ms=5),
        snapshot_name(20, 9),
    ]
    assert [n.first_txid for n in sorted(names)] == [10, 10, 20]
