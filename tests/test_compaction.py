"""Compaction: merged segments restore the same database; planning; compacting a real replica."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicad.clients.file import FileReplicaClient
from replicad.compaction import (
    CompactionJob,
    compact,
    merge_segments,
    plan_compaction,
)
from replicad.errors import FormatError
from replicad.format import (
    ObjectHeader,
    Transaction,
    TxnInfo,
    decode_object,
    encode_object,
)
from replicad.position import ObjectKind, ObjectName, WalPosition, segment_name, snapshot_name
from replicad.restore import plan_restore

FAST = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
PAGE = 512
HOUR_MS = 3_600_000
T0_MS = 472_222 * HOUR_MS  # on an hour boundary, so buckets of every level start here
T0_NS = T0_MS * 1_000_000
Image = tuple[dict[int, bytes], int]  # page number -> content, database size in pages
Decoded = tuple[ObjectHeader, list[Transaction]]


# -------------------------------------------------------------------------------------------------
# Databases as page maps, and segments that change them


def page(seed: int) -> bytes:
    return seed.to_bytes(8, "little") * (PAGE // 8)


def apply_each(image: Image, txns: Iterable[Transaction], upto: int | None = None) -> Image:
    """The reference: each transaction writes its pages, then the database is cut to its size."""
    pages, size = dict(image[0]), image[1]
    for txn in txns:
        if upto is not None and txn.info.txid > upto:
            break
        pages.update(txn.pages)
        size = txn.info.db_pages
        pages = {p: data for p, data in pages.items() if p <= size}
    return pages, size


def apply_like_restore(image: Image, txns: Iterable[Transaction], upto: int | None = None) -> Image:
    """What `replicad.restore` does: write every page in order, cut to the last size once."""
    pages, size = dict(image[0]), image[1]
    for txn in txns:
        if upto is not None and txn.info.txid > upto:
            break
        pages.update(txn.pages)
        size = txn.info.db_pages
    return {p: data for p, data in pages.items() if p <= size}, size


def header_of(
    txns: Sequence[Transaction], *, level: int = 0, page_size: int = PAGE
) -> ObjectHeader:
    first, last = txns[0].info, txns[-1].info
    return ObjectHeader(
        kind=ObjectKind.SEGMENT,
        page_size=page_size,
        level=level,
        first_txid=first.txid,
        last_txid=last.txid,
        min_time_ns=first.commit_time_ns,
        max_time_ns=last.commit_time_ns,
        db_pages=last.db_pages,
        position=WalPosition(1, 2, 32 + last.txid * (24 + PAGE), 3, 4),
    )


def name_of(header: ObjectHeader) -> ObjectName:
    return segment_name(
        level=header.level,
        first_txid=header.first_txid,
        last_txid=header.last_txid,
        min_time_ms=header.min_time_ns // 1_000_000,
        max_time_ms=header.max_time_ns // 1_000_000,
    )


def txn(txid: int, db_pages: int, pgnos: Iterable[int], *, at_ns: int | None = None) -> Transaction:
    pages = [(p, page(txid * 1000 + i)) for i, p in enumerate(pgnos)]
    time_ns = T0_NS + txid * 1_000_000 if at_ns is None else at_ns
    return Transaction(TxnInfo(txid, time_ns, db_pages, len(pages)), pages)


@st.composite
def histories(
    draw: st.DrawFn, *, realistic: bool | None = None, min_segments: int = 1
) -> tuple[Image, list[Decoded], bool]:
    """A base database, then level-0 segments of TXIDs 2.. that change it.

    Realistic histories write every page a transaction adds to the database, as SQLite does;
    the others may also shrink the database, then grow it past pages they do not write again.
    """
    if realistic is None:
        realistic = draw(st.booleans())
    size = draw(st.integers(1, 6))
    base = {p: page(10**6 + p) for p in range(1, size + 1)}
    count = draw(st.integers(min_segments, 14))
    time_ns = T0_NS
    txns = []
    for txid in range(2, count + 2):
        new_size = max(1, size + draw(st.integers(-4, 4)))
        pgnos = draw(st.lists(st.integers(1, 12), max_size=5))
        if realistic:
            pgnos += range(size + 1, new_size + 1)
        time_ns += draw(st.sampled_from([0, 1, 999_999, 30_000_000_000]))
        txns.append(txn(txid, new_size, pgnos, at_ns=time_ns))
        size = new_size
    cuts = draw(
        st.lists(st.integers(1, count - 1), unique=True, min_size=min_segments - 1)
        if count > 1
        else st.just([])
    )
    bounds = [0, *sorted(cuts), count]
    segments = [(header_of(txns[a:b]), txns[a:b]) for a, b in pairwise(bounds)]
    return (base, len(base)), segments, realistic


def all_txns(segments: Iterable[Decoded]) -> list[Transaction]:
    return [t for _, txns in segments for t in txns]


# -------------------------------------------------------------------------------------------------
# merge_segments


@FAST
@given(histories())
def test_merged_segment_changes_the_database_as_its_sources_do(
    history: tuple[Image, list[Decoded], bool],
) -> None:
    base, segments, realistic = history
    sources = all_txns(segments)

    name, header, merged = merge_segments(segments, level=1)

    assert apply_like_restore(base, merged) == apply_like_restore(base, sources)
    if realistic:
        assert apply_each(base, merged) == apply_each(base, sources)
    # One record per TXID, each with its own commit time and size; the pages in the last.
    assert [t.info.txid for t in merged] == [t.info.txid for t in sources]
    assert [(t.info.commit_time_ns, t.info.db_pages) for t in merged] == [
        (t.info.commit_time_ns, t.info.db_pages) for t in sources
    ]
    assert all(t.info.page_count == 0 and not t.pages for t in merged[:-1])
    pgnos = [p for p, _ in merged[-1].pages]
    assert pgnos == sorted(set(pgnos))
    assert all(p <= header.db_pages for p in pgnos)
    first, last = segments[0][0], segments[-1][0]
    assert header == ObjectHeader(
        kind=ObjectKind.SEGMENT,
        page_size=PAGE,
        level=1,
        first_txid=first.first_txid,
        last_txid=last.last_txid,
        min_time_ns=first.min_time_ns,
        max_time_ns=last.max_time_ns,
        db_pages=sources[-1].info.db_pages,
        position=last.position,
    )
    assert name == name_of(header)
    assert decode_object(encode_object(header, merged), expected=name) == (header, merged)


def restore_image(objects: dict[ObjectName, bytes], plan: Sequence[ObjectName], upto: int) -> Image:
    """Apply a restore plan's objects as `replicad.restore` does, from their encoded bytes."""
    image: Image = ({}, 0)
    for name in plan:
        _, txns = decode_object(objects[name], expected=name)
        image = apply_each(image, txns, upto)
    return image


@FAST
@given(histories(realistic=True, min_segments=3), st.data())
def test_restore_uses_the_merged_segment_only_where_it_ends(
    history: tuple[Image, list[Decoded], bool], data: st.DataObject
) -> None:
    (base_pages, base_size), segments, _ = history
    snapshot_pages = [(p, base_pages[p]) for p in range(1, base_size + 1)]
    snapshot = snapshot_name(1, T0_MS)
    objects = {
        snapshot: encode_object(
            ObjectHeader(ObjectKind.SNAPSHOT, PAGE, 0, 1, 1, T0_NS, T0_NS, base_size, None),
            [Transaction(TxnInfo(1, T0_NS, base_size, base_size), snapshot_pages)],
        )
    }
    for header, txns in segments:
        objects[name_of(header)] = encode_object(header, txns)
    i = data.draw(st.integers(0, len(segments) - 2))
    j = data.draw(st.integers(i + 2, len(segments)))
    l1, header, merged = merge_segments(segments[i:j], level=1)
    objects[l1] = encode_object(header, merged)
    sources = all_txns(segments)

    for target in range(1, sources[-1].info.txid + 1):
        plan = plan_restore(dict.fromkeys(objects, 1), target_txid=target)
        assert (l1 in plan.segments) == (target >= l1.last_txid), target
        restored = restore_image(objects, plan.objects, target)
        assert restored == apply_each((base_pages, base_size), sources, target), target


def test_merge_refuses_inputs_that_cannot_share_an_object() -> None:
    a = [txn(1, 3, [1, 2])]
    b = [txn(2, 3, [3])]
    ok = [(header_of(a), a), (header_of(b), b)]
    assert merge_segments(ok, level=1)[0].last_txid == 2

    with pytest.raises(FormatError, match="page size"):
        merge_segments([(header_of(a), a), (header_of(b, page_size=1024), b)], level=1)
    late = [txn(2, 3, [3], at_ns=a[0].info.commit_time_ns - 1)]
    with pytest.raises(FormatError, match="commit times go backwards"):
        merge_segments([(header_of(a), a), (header_of(late), late)], level=1)
    c = [txn(3, 3, [3])]
    with pytest.raises(ValueError, match="does not start right after"):
        merge_segments([(header_of(a), a), (header_of(c), c)], level=1)
    with pytest.raises(ValueError, match="not below level 1"):
        merge_segments([(header_of(a, level=1), a), (header_of(b), b)], level=1)
    with pytest.raises(ValueError, match="do not match their header"):
        merge_segments([(header_of(a), a), (header_of(b), a)], level=1)
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_segments([], level=1)


# -------------------------------------------------------------------------------------------------
# plan_compaction


def seg(
    first: int, last: int, at_ms: int, *, level: int = 0, since_ms: int | None = None
) -> ObjectName:
    """A segment of TXIDs first..last committed at `since_ms`..`at_ms` after T0."""
    return segment_name(
        level=level,
        first_txid=first,
        last_txid=last,
        min_time_ms=T0_MS + (at_ms if since_ms is None else since_ms),
        max_time_ms=T0_MS + at_ms,
    )


def per_second(count: int, *, first_txid: int = 1, start_s: int = 0) -> list[ObjectName]:
    """One level-0 segment of one transaction per second."""
    return [seg(first_txid + i, first_txid + i, (start_s + i) * 1000) for i in range(count)]


def ranges(jobs: Iterable[CompactionJob]) -> list[tuple[int, int, int]]:
    return [(j.level, j.sources[0].first_txid, j.sources[-1].last_txid) for j in jobs]


def output_of(job: CompactionJob) -> ObjectName:
    first, last = job.sources[0], job.sources[-1]
    return segment_name(
        level=job.level,
        first_txid=first.first_txid,
        last_txid=last.last_txid,
        min_time_ms=first.min_time_ms,
        max_time_ms=last.max_time_ms,
    )


def test_closed_buckets_become_jobs_once_settled() -> None:
    names = per_second(90)

    def planned(now_s: float, settle_ms: int = 5000) -> list[tuple[int, int, int]]:
        now_ms = T0_MS + int(now_s * 1000)
        return ranges(plan_compaction(names, levels=(30,), now_ms=now_ms, settle_ms=settle_ms))

    assert planned(34.999) == []
    assert planned(35) == [(1, 1, 30)]
    assert planned(94.999) == [(1, 1, 30), (1, 31, 60)]
    assert planned(95) == [(1, 1, 30), (1, 31, 60), (1, 61, 90)]
    assert planned(90, settle_ms=0) == planned(95)
    job = plan_compaction(names, levels=(30,), now_ms=T0_MS + 35_000)[0]
    assert job.sources == tuple(names[:30])


def test_buckets_covered_at_their_level_are_skipped() -> None:
    names = per_second(90)
    done = [
        seg(1, 30, 29_000, level=1, since_ms=0),  # exactly the bucket
        seg(31, 45, 44_000, level=1, since_ms=30_000),  # the bucket, cut in two
        seg(46, 60, 59_000, level=1, since_ms=45_000),
        seg(61, 80, 79_000, level=1, since_ms=60_000),  # a segment came late: merged again
    ]
    jobs = plan_compaction(names + done, levels=(30,), now_ms=T0_MS + HOUR_MS)
    assert ranges(jobs) == [(1, 61, 90)]
    wider = seg(1, 90, 89_000, level=1, since_ms=0)
    assert plan_compaction([*names, wider], levels=(30,), now_ms=T0_MS + HOUR_MS) == []


def test_gaps_and_clocks_going_back_split_runs_and_single_objects_are_not_copied() -> None:
    names = [
        *per_second(10),  # 1..10
        seg(12, 12, 10_000),  # after a lost continuity (snapshot at 11): alone, not copied
        seg(14, 15, 12_000),  # after another jump
        seg(16, 16, 13_000),
        seg(17, 17, 11_000),  # the clock stepped back: a run of its own
        seg(18, 18, 12_500),
    ]
    jobs = plan_compaction(names, levels=(30,), now_ms=T0_MS + HOUR_MS)
    assert ranges(jobs) == [(1, 1, 10), (1, 14, 16), (1, 17, 18)]
    assert plan_compaction(per_second(1), levels=(30,), now_ms=T0_MS + HOUR_MS) == []


def test_higher_levels_are_built_from_the_level_below() -> None:
    names = per_second(300)  # one 5-minute bucket, ten 30-second buckets
    now_ms = T0_MS + HOUR_MS
    first = plan_compaction(names, levels=(30, 300), now_ms=now_ms)
    # Level 2 waits for level 1 instead of merging 300 level-0 objects.
    assert ranges(first) == [(1, 30 * i + 1, 30 * i + 30) for i in range(10)]
    level1 = [output_of(job) for job in first]

    second = plan_compaction(names + level1, levels=(30, 300), now_ms=now_ms)
    assert len(second) == 1
    assert second[0].level == 2
    assert second[0].sources == tuple(level1)
    assert (
        plan_compaction([*names, *level1, output_of(second[0])], levels=(30, 300), now_ms=now_ms)
        == []
    )


def test_quiet_database_still_gets_coarse_objects() -> None:
    # One commit a minute: every 30-second bucket holds one segment, so level 1 has nothing to
    # do and level 2 merges the level-0 segments directly.
    names = [seg(i + 1, i + 1, i * 60_000) for i in range(10)]
    jobs = plan_compaction(names, levels=(30, 300), now_ms=T0_MS + HOUR_MS)
    assert ranges(jobs) == [(2, 1, 5), (2, 6, 10)]
    assert jobs[0].sources == tuple(names[:5])


def test_levels_must_nest_and_jobs_must_be_consecutive() -> None:
    for levels in [(30, 45), (0,), (30, 30), (-1,)]:
        with pytest.raises(ValueError, match="multiple of the level below"):
            plan_compaction([], levels=levels, now_ms=T0_MS)
    with pytest.raises(ValueError, match="settle_ms"):
        plan_compaction([], now_ms=T0_MS, settle_ms=-1)
    with pytest.raises(ValueError, match="does not start right after"):
        CompactionJob(1, (seg(1, 2, 0), seg(4, 5, 0)))
    with pytest.raises(ValueError, match="not a segment"):
        CompactionJob(1, (snapshot_name(1, T0_MS),))
    with pytest.raises(ValueError, match="not below level 1"):
        CompactionJob(1, (seg(1, 2, 0, level=1),))
    with pytest.raises(ValueError, match="out of range"):
        CompactionJob(0, (seg(1, 2, 0),))


def test_compacting_until_nothing_is_left_keeps_every_txid_restorable() -> None:
    """Two hours of bursty, sometimes quiet history with a lost continuity, compacted round
    after round: it converges, a restore reads a handful of objects, and no restore ever
    applies a compacted segment partly.
    """
    rnd = random.Random(7)
    names: list[ObjectName] = [snapshot_name(1, T0_MS)]
    txid, at_ms, lost_at = 2, 0, 0
    while at_ms < 2 * HOUR_MS:
        if not lost_at and at_ms >= 90 * 60_000:
            lost_at = txid  # the snapshot after a lost continuity takes a TXID no segment holds
            names.append(snapshot_name(txid, T0_MS + at_ms))
            txid += 1
        count = rnd.choice([1, 1, 2, 5])
        names.append(seg(txid, txid + count - 1, at_ms + 500, since_ms=at_ms))
        txid += count
        at_ms += rnd.choice([45_000, 400_000]) if rnd.random() < 0.01 else 1000
    now_ms = T0_MS + 3 * HOUR_MS

    rounds = 0
    while jobs := plan_compaction(names, now_ms=now_ms):
        rounds += 1
        names += [output_of(job) for job in jobs]
    assert rounds == 3

    segments = [n for n in names if n.kind is ObjectKind.SEGMENT]
    level0 = [n for n in segments if n.level == 0]
    compacted = [n for n in segments if n.level > 0]
    assert len(level0) > 1000
    # Compacted segments start and end where level-0 segments do, so a restore stopping
    # inside one finds a level-0 segment to apply partly.
    assert {n.first_txid for n in compacted} <= {n.first_txid for n in level0}
    assert {n.last_txid for n in compacted} <= {n.last_txid for n in level0}
    sizes = dict.fromkeys(names, 1)
    assert len(plan_restore(sizes, target_txid=lost_at - 1).segments) < 25
    targets = {n.last_txid + d for n in compacted for d in (-1, 0, 1)}
    targets |= set(rnd.sample(range(1, txid), 300))
    for target in sorted(targets & set(range(1, txid))):
        chain = plan_restore(sizes, target_txid=target).segments
        assert all(n.level == 0 for n in chain if n.last_txid > target), target


# -------------------------------------------------------------------------------------------------
# compact() against a local-directory replica


def l0_segments(count: int, *, new_pages: int = 2) -> list[Decoded]:
    """`count` one-transaction segments of TXIDs 1..count; each adds `new_pages` pages and
    rewrites page 1.
    """
    segments = []
    for i in range(count):
        size = (i + 1) * new_pages
        t = [txn(i + 1, size, [1, *range(size - new_pages + 1, size + 1)])]
        segments.append((header_of(t), t))
    return segments


async def store(client: FileReplicaClient, segments: Iterable[Decoded]) -> dict[ObjectName, bytes]:
    stored = {}
    for header, txns in segments:
        name = name_of(header)
        stored[name] = encode_object(header, txns)
        await client.put_object(name.key, stored[name])
    return stored


async def test_compact_writes_one_merged_segment(tmp_path: Path) -> None:
    segments = l0_segments(4)
    async with FileReplicaClient(tmp_path / "replica") as client:
        stored = await store(client, segments)
        job = CompactionJob(1, tuple(stored))

        written = await compact(client, job)

        expected_name, header, merged = merge_segments(segments, level=1)
        assert [name for name, _ in written] == [expected_name]
        assert expected_name.key.startswith("segments/01/")
        listing = {info.key: info.size for info in await client.list_objects()}
        assert listing[expected_name.key] == written[0][1]
        assert all(name.key in listing for name in stored)  # nothing deleted
        data = await client.get_object(expected_name.key)
        assert decode_object(data, expected=expected_name) == (header, merged)


async def test_compact_cuts_a_large_job_between_sources(tmp_path: Path) -> None:
    segments = l0_segments(10, new_pages=2)
    async with FileReplicaClient(tmp_path / "replica") as client:
        stored = await store(client, segments)
        # Half the sources come from the cache: no GET for them.
        cache = {name: data for i, (name, data) in enumerate(stored.items()) if i % 2}
        limit = 7 * PAGE

        written = await compact(
            client, CompactionJob(1, tuple(stored)), cache=cache, max_merge_bytes=limit
        )

        assert client.stats.requests["GET"] == 5
        names = [name for name, _ in written]
        assert len(names) > 1
        assert names[0].first_txid == 1
        assert names[-1].last_txid == 10
        boundaries = {n.last_txid for n in stored}
        state: Image = ({}, 0)
        for before, after in pairwise(names):
            assert after.first_txid == before.last_txid + 1
            assert before.last_txid in boundaries
        for name in names:
            _, txns = decode_object(await client.get_object(name.key), expected=name)
            assert len(txns[-1].pages) * PAGE <= limit
            state = apply_each(state, txns)
        assert state == apply_each(({}, 0), all_txns(segments))


async def test_compact_starts_a_new_object_where_commit_times_go_back(tmp_path: Path) -> None:
    # Within one millisecond, so the names (and the planner) cannot tell.
    a = [txn(1, 2, [1, 2], at_ns=T0_NS + 900_000)]
    b = [txn(2, 2, [2], at_ns=T0_NS + 100_000)]
    async with FileReplicaClient(tmp_path / "replica") as client:
        stored = await store(client, [(header_of(a), a), (header_of(b), b)])
        written = await compact(client, CompactionJob(1, tuple(stored)))
    assert [(n.first_txid, n.last_txid, n.level) for n, _ in written] == [(1, 1, 1), (2, 2, 1)]


async def test_corrupt_source_raises_and_writes_nothing(tmp_path: Path) -> None:
    async with FileReplicaClient(tmp_path / "replica") as client:
        stored = await store(client, l0_segments(3))
        victim = list(stored)[2]
        damaged = bytearray(stored[victim])
        damaged[len(damaged) // 2] ^= 0x10
        await client.put_object(victim.key, bytes(damaged))

        with pytest.raises(FormatError):
            await compact(client, CompactionJob(1, tuple(stored)))

        assert await client.list_objects("segments/01/") == []
        # A source stored under the wrong name is refused the same way.
        await client.put_object(victim.key, stored[list(stored)[1]])
        with pytest.raises(FormatError, match="does not match its key"):
            await compact(client, CompactionJob(1, tuple(stored)))
        assert await client.list_objects("segments/01/") == []
