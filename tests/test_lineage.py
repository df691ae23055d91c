"""Lineage (format v2): database checksums chain every object to one history.

Pure checks of the page-hash table and the planner (property tests over interleaved branches),
then restores of real objects in a file replica: a restore is proven equal to the source, a
stale branch is skipped and never spliced in, and a replica written by replicad 0.1 (format
v1, tests/data/v1-replica) still restores, saying that it cannot be proven.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from replicad.checksum import PageHashes, file_checksum, page_hash
from replicad.clients.file import FileReplicaClient
from replicad.errors import FormatError, HistoryForkError, RestoreError
from replicad.format import (
    ObjectHeader,
    Transaction,
    TxnInfo,
    decode_object,
    encode_object,
    object_name,
)
from replicad.position import NO_CHECKSUM, ObjectKind, ObjectName, parse_key
from replicad.restore import RestorePlan, RestoreResult, plan_restore, restore
from replicad.verify import VerifyReport, verify_replica

PAGE = 512
T0 = 1_700_000_000_000_000_000
V1_REPLICA = Path(__file__).parent / "data" / "v1-replica"


# -- the page-hash table ----------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(st.integers(1, 40), st.integers(0, 255), st.integers(1, 40)),
        min_size=1,
        max_size=60,
    )
)
@settings(max_examples=150, deadline=None)
def test_page_hashes_track_the_checksum_of_the_whole_database(
    steps: list[tuple[int, int, int]],
) -> None:
    """After any sequence of page writes and resizes, the running checksum equals the XOR of
    the hashes of every page (zeros where never written), computed from scratch.
    """
    table = PageHashes(PAGE)
    model: dict[int, bytes] = {}
    size = 0
    for pgno, fill, new_size in steps:
        data = bytes([fill]) * PAGE
        table.set_page(pgno, data)
        model[pgno] = data
        size = max(size, pgno)
        table.set_size(new_size)
        size = new_size
        model = {p: d for p, d in model.items() if p <= size}
        expected = 0
        for p in range(1, size + 1):
            expected ^= page_hash(p, model.get(p, bytes(PAGE)))
        assert table.checksum == expected
        assert table.db_pages == size


def test_page_hashes_save_load_and_diff(tmp_path: Path) -> None:
    table = PageHashes.build(PAGE, ((p, bytes([p]) * PAGE) for p in range(1, 11)))
    path = tmp_path / "hashes"
    table.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = PageHashes.load(path)
    assert loaded is not None
    assert loaded.checksum == table.checksum
    table.set_page(3, b"x" * PAGE)
    table.set_size(12)
    assert table.diff(loaded) == [3, 11, 12]
    # A damaged file is not trusted: its hashes no longer add up to its recorded checksum.
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert PageHashes.load(path) is None


def test_page_hashes_spill_to_an_unlinked_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("replicad.checksum.MEMORY_LIMIT", 8 * 1024)
    table = PageHashes(PAGE, spill_dir=tmp_path)
    for pgno in range(1, 3000):
        table.set_page(pgno, pgno.to_bytes(4, "little") * (PAGE // 4))
    memory = PageHashes.build(
        PAGE, ((p, p.to_bytes(4, "little") * (PAGE // 4)) for p in range(1, 3000))
    )
    assert table.checksum == memory.checksum
    assert list(tmp_path.iterdir()) == []  # unlinked: a crash leaves nothing behind


# -- format v2 --------------------------------------------------------------------------------


def test_chained_objects_round_trip_with_their_checksums() -> None:
    txns = [
        Transaction(TxnInfo(5 + i, T0 + i, 3, 1), [(2, bytes([i]) * PAGE)], checksum=100 + i)
        for i in range(3)
    ]
    header = ObjectHeader(
        kind=ObjectKind.SEGMENT,
        page_size=PAGE,
        level=0,
        first_txid=5,
        last_txid=7,
        min_time_ns=T0,
        max_time_ns=T0 + 2,
        db_pages=3,
        position=None,
        pre_checksum=99,
        post_checksum=102,
    )
    name = object_name(header)
    assert (name.pre, name.post) == (99, 102)
    assert parse_key(name.key) == name
    decoded_header, decoded = decode_object(encode_object(header, txns), expected=name)
    assert decoded_header == header
    assert [t.checksum for t in decoded] == [100, 101, 102]
    # Content under a key that claims other checksums is refused.
    wrong = ObjectName(5, 7, 0, ObjectKind.SEGMENT, name.min_time_ms, name.max_time_ms, 1, 102)
    with pytest.raises(FormatError, match="checksums differ"):
        decode_object(encode_object(header, txns), expected=wrong)


# -- planning over interleaved branches ---------------------------------------------------------


def _state(branch: str, txid: int, fork: int) -> int:
    """The checksum of the state after `txid` on `branch` (shared up to `fork`)."""
    tag = "trunk" if txid <= fork else branch
    return int.from_bytes(hashlib.blake2b(f"{tag}:{txid}".encode(), digest_size=8).digest())


def _branch_objects(
    rng: random.Random, branch: str, fork: int, first: int, last: int
) -> list[ObjectName]:
    """A snapshot at `first` and level-0 segments up to `last` for one branch's history."""
    names = [ObjectName(first, first, 0, ObjectKind.SNAPSHOT, 0, 0, 0, _state(branch, first, fork))]
    txid = first + 1
    while txid <= last:
        end = min(last, txid + rng.randint(0, 4))
        pre, post = _state(branch, txid - 1, fork), _state(branch, end, fork)
        names.append(ObjectName(txid, end, 0, ObjectKind.SEGMENT, 0, 0, pre, post))
        txid = end + 1
    return names


def _restorable(objects: dict[ObjectName, int]) -> set[int]:
    """Every TXID some verified chain reaches, by brute force: states are (TXID, checksum), an
    object leads from the state before it to every state inside it (partial application of a
    level-0 segment) and to the one after it.
    """
    states = {(n.last_txid, n.post) for n in objects if n.kind is ObjectKind.SNAPSHOT}
    txids = {txid for txid, _ in states}
    grew = True
    while grew:
        grew = False
        for n in objects:
            if n.kind is ObjectKind.SEGMENT and (n.first_txid - 1, n.pre) in states:
                txids.update(range(n.first_txid, n.last_txid + 1))
                if (n.last_txid, n.post) not in states:
                    states.add((n.last_txid, n.post))
                    grew = True
    return txids


def _plan_or_none(objects: dict[ObjectName, int], target: int | None) -> RestorePlan | None:
    try:
        return plan_restore(objects, target_txid=target)
    except RestoreError:
        return None


def _assert_verified_chain(chain: tuple[ObjectName, ...]) -> None:
    for before, after in itertools.pairwise(chain):
        assert after.first_txid == before.last_txid + 1
        assert after.pre == before.post, f"spliced {before.key} and {after.key}"


@given(st.integers(0, 2**32), st.integers(1, 30), st.integers(0, 30), st.integers(0, 30))
@settings(max_examples=300, deadline=None)
def test_a_plan_never_splices_two_histories(seed: int, fork: int, a_len: int, b_len: int) -> None:
    """Two branches (two daemons, a lapsed lease) interleave under one prefix, each with its
    own snapshot somewhere and some objects missing.  Every plan is one verified chain, and
    every TXID one branch alone can restore is restorable.
    """
    rng = random.Random(seed)
    objects: dict[ObjectName, int] = {}
    for branch, length in (("a", a_len), ("b", b_len)):
        start = rng.randint(1, fork)
        names = _branch_objects(rng, branch, fork, start, fork + length)
        if rng.random() < 0.3 and len(names) > 2:  # a lost object: that branch has a gap
            lost = rng.randrange(1, len(names))
            names = names[:lost] + names[lost + 1 :]
        objects.update(dict.fromkeys(names, 1))
    reachable = _restorable(objects)
    newest = max(n.last_txid for n in objects)
    for target in [None, *rng.sample(range(1, newest + 1), min(5, newest))]:
        plan = _plan_or_none(objects, target)
        if plan is None:  # only when no chain reaches the target
            assert target not in reachable if target is not None else newest not in reachable
            continue
        _assert_verified_chain(plan.objects)
        assert plan.verified
        if target is not None:
            assert plan.target_txid == target
        else:
            assert plan.target_txid == max(reachable)


def test_a_fork_names_the_objects_that_disagree() -> None:
    rng = random.Random(1)
    trunk = _branch_objects(rng, "a", 3, 1, 5)
    stale = [n for n in _branch_objects(rng, "b", 3, 1, 9) if n.first_txid > 5]
    objects = dict.fromkeys(trunk + stale, 1)
    with pytest.raises(HistoryForkError, match="belong to another history") as info:
        plan_restore(objects, target_txid=8)
    assert stale[0].key in info.value.message
    # Latest is the newest state a chain reaches, with a warning naming what was left out.
    plan = plan_restore(objects)
    assert plan.target_txid == 5
    assert plan.warnings
    assert stale[0].key in plan.warnings[0]


# -- restoring real objects ---------------------------------------------------------------------


def _db_pages(rows: int) -> list[bytes]:
    """The pages of a real SQLite database with `rows` rows, made in memory."""
    conn = sqlite3.connect(":memory:")
    conn.execute(f"PRAGMA page_size = {PAGE}")
    conn.execute("CREATE TABLE t(v)")
    conn.executemany("INSERT INTO t VALUES (?)", [(f"row {i}" * 8,) for i in range(rows)])
    conn.commit()
    data = conn.serialize()
    conn.close()
    return [data[i : i + PAGE] for i in range(0, len(data), PAGE)]


class _Writer:
    """Writes a history of real database states as chained objects into a file replica."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.time = T0

    def put(self, header: ObjectHeader, txns: list[Transaction]) -> ObjectName:
        name = object_name(header)
        path = self.root / name.key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_object(header, txns))
        return name

    def snapshot(self, txid: int, pages: list[bytes]) -> ObjectName:
        checksum = PageHashes.build(PAGE, enumerate(pages, 1)).checksum
        self.time += 1000
        header = ObjectHeader(
            ObjectKind.SNAPSHOT,
            PAGE,
            0,
            txid,
            txid,
            self.time,
            self.time,
            len(pages),
            None,
            pre_checksum=0,
            post_checksum=checksum,
        )
        info = TxnInfo(txid, self.time, len(pages), len(pages))
        return self.put(header, [Transaction(info, list(enumerate(pages, 1)), checksum)])

    def segment(self, first: int, before: list[bytes], states: list[list[bytes]]) -> ObjectName:
        """Transactions `first..` taking `before` through each of `states` (changed pages)."""
        table = PageHashes.build(PAGE, enumerate(before, 1))
        pre = table.checksum
        txns = []
        previous = before
        for i, state in enumerate(states):
            self.time += 1000
            changed = [
                (p, d) for p, d in enumerate(state, 1) if p > len(previous) or previous[p - 1] != d
            ]
            for p, d in changed:
                table.set_page(p, d)
            table.set_size(len(state))
            info = TxnInfo(first + i, self.time, len(state), len(changed))
            txns.append(Transaction(info, changed, table.checksum))
            previous = state
        header = ObjectHeader(
            ObjectKind.SEGMENT,
            PAGE,
            0,
            first,
            first + len(states) - 1,
            txns[0].info.commit_time_ns,
            txns[-1].info.commit_time_ns,
            len(states[-1]),
            None,
            pre_checksum=pre,
            post_checksum=table.checksum,
        )
        return self.put(header, txns)


def _rows(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    finally:
        conn.close()


def _restore(root: Path, out: Path, **kwargs: Any) -> RestoreResult:
    async def run() -> RestoreResult:
        client = FileReplicaClient(root)
        try:
            return await restore(client, out, **kwargs)
        finally:
            await client.close()

    return asyncio.run(run())


def test_restore_is_proven_and_skips_a_stale_branch(tmp_path: Path) -> None:
    """Daemon B's snapshot, daemon A's stale segments at the same TXIDs (states that never
    followed B's), B's own segments: the newest restore is B's, proven; never A's on top.
    """
    root = tmp_path / "replica"
    w = _Writer(root)
    states = [_db_pages(n) for n in range(1, 12)]
    stale = [_db_pages(100 + n) for n in range(4)]
    w.snapshot(1, states[0])
    w.segment(2, states[0], stale[:3])  # daemon A: TXIDs 2-4 of another history
    w.segment(2, states[0], states[1:4])  # daemon B: TXIDs 2-4
    w.segment(5, stale[2], stale[3:4])  # A goes on: TXID 5
    w.segment(5, states[3], states[4:6])  # B: TXIDs 5-6
    out = tmp_path / "out.db"
    result = _restore(root, out)
    assert result.txid == 6
    assert result.checksum == file_checksum(out, PAGE, len(states[5]))
    assert out.read_bytes() == b"".join(states[5])
    for txid in range(1, 7):
        target = tmp_path / f"at-{txid}.db"
        _restore(root, target, target_txid=txid)
        assert target.read_bytes() == b"".join(states[txid - 1])


def test_restore_refuses_objects_that_do_not_add_up(tmp_path: Path) -> None:
    """A segment whose names and headers chain but whose pages belong to another state (a
    writer bug, or a forged object): the restored file's checksum gives it away.
    """
    root = tmp_path / "replica"
    w = _Writer(root)
    states = [_db_pages(n) for n in (1, 2, 3)]
    w.snapshot(1, states[0])
    honest = w.segment(2, states[0], states[1:3])
    forged_pages = _db_pages(50)
    data, txns = decode_object((root / honest.key).read_bytes())
    lying = [
        Transaction(t.info, [(p, forged_pages[p - 1]) for p, _ in t.pages], t.checksum)
        for t in txns
    ]
    (root / honest.key).write_bytes(encode_object(data, lying))
    out = tmp_path / "out.db"
    with pytest.raises(RestoreError, match="checksum"):
        _restore(root, out, integrity="none")
    assert not out.exists()


def test_a_format_v1_replica_still_restores_and_says_it_is_unproven(tmp_path: Path) -> None:
    root = tmp_path / "replica"
    shutil.copytree(V1_REPLICA, root)
    assert all(not n.chained for n in map(parse_key, _keys(root)) if n is not None)
    out = tmp_path / "out.db"
    with capture_logs() as logs:
        result = _restore(root, out)
    assert result.checksum is None
    assert _rows(out) == 33
    assert any("format v1" in entry["event"] for entry in logs)
    assert NO_CHECKSUM == -1


def _keys(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]


# -- a restart ships only what changed (real processes) ------------------------------------------


def test_restart_after_writes_and_a_checkpoint_ships_only_the_changed_pages(tmp_path: Path) -> None:
    """The daemon stops cleanly; the application writes and checkpoints (TRUNCATE: the WAL
    restarts, so resuming from the WAL is impossible); the restarted daemon uploads one segment
    of the changed pages instead of a snapshot, and every TXID before and after restores
    exactly.
    """
    from tests import workload
    from tests.procs import start_daemon, start_writer, stop, wait_for

    db, replica, dlog, wlog = (tmp_path / n for n in ("app.db", "rep", "d.log", "w.log"))
    conn = sqlite3.connect(db)
    workload.setup(conn)
    conn.execute("CREATE TABLE ballast(b BLOB)")  # pages the writes below never touch
    conn.executemany("INSERT INTO ballast VALUES (randomblob(3000))", [()] * 400)
    conn.commit()
    conn.close()
    args = [str(db), replica.as_uri()]
    snapshots = replica / "snapshots"
    daemon = start_daemon(args, dlog)
    try:
        wait_for(lambda: snapshots.exists() and any(snapshots.iterdir()), 30, "the first snapshot")
        assert start_writer(db, wlog, seed=21, count=150, rate=300).wait(timeout=60) == 0
    finally:
        assert stop(daemon) == 0, dlog.read_text()[-3000:]
    assert start_writer(db, wlog, seed=21, count=60, rate=0).wait(timeout=60) == 0
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    conn.close()
    daemon = start_daemon(args, dlog)
    try:
        wait_for(lambda: "restarted without a snapshot" in dlog.read_text(), 30, "the restart")
    finally:
        assert stop(daemon) == 0, dlog.read_text()[-3000:]
    assert len(list(snapshots.iterdir())) == 1
    restart = json.loads(
        next(line for line in dlog.read_text().splitlines() if "without a snapshot" in line)
    )
    names = sorted(n for n in map(parse_key, _keys(replica)) if n is not None)
    jump = max(names, key=lambda n: n.last_txid)
    assert jump.kind is ObjectKind.SEGMENT
    assert jump.first_txid == jump.last_txid
    # The segment holds exactly the pages that differ between the states before and after.
    before, after = tmp_path / "before.db", tmp_path / "after.db"
    _restore(replica, before, target_txid=jump.last_txid - 1)
    _restore(replica, after, target_txid=jump.last_txid)
    old, new = before.read_bytes(), after.read_bytes()
    pages = [new[i : i + 4096] for i in range(0, len(new), 4096)]
    differ = sum(1 for i, page in enumerate(pages) if old[i * 4096 : (i + 1) * 4096] != page)
    assert restart["pages"] == differ < len(pages) / 2

    # Every TXID restores to a committed state of the writer's log, proven by its checksum.
    def view(path: Path) -> object:  # the writer's content: the ballast is not in its model
        content = workload.dump(path)
        content["schema"] = [row for row in content["schema"] if row[1] != "ballast"]
        content["rows"].pop("ballast", None)
        return content

    model = workload.replays(21, set(range(211)), tmp_path / "replay.db", view=view)
    seen = set()
    for txid in range(1, jump.last_txid + 1):
        out = tmp_path / f"at-{txid}.db"
        result = _restore(replica, out, target_txid=txid, integrity="none")
        assert result.checksum is not None
        k = workload.seq_of(out)
        assert view(out) == model[k], txid
        seen.add(k)
        out.unlink()
    assert max(seen) == 210
    # The live database equals the replica's newest state; after one more write it does not.
    from tests.procs import replicad

    checked = replicad("verify", replica.as_uri(), "--db", str(db))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "same checksum" in checked.stdout
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET seq = seq + 1")
    conn.commit()
    conn.close()
    checked = replicad("verify", replica.as_uri(), "--db", str(db))
    assert checked.returncode == 1
    assert "differs from the replica" in checked.stdout


# -- replicad verify ------------------------------------------------------------------------------


def _verify(root: Path, **kwargs: Any) -> VerifyReport:
    async def run() -> VerifyReport:
        client = FileReplicaClient(root)
        try:
            return await verify_replica(client, **kwargs)
        finally:
            await client.close()

    return asyncio.run(run())


def _good_replica(root: Path) -> tuple[list[list[bytes]], list[ObjectName]]:
    w = _Writer(root)
    states = [_db_pages(n) for n in range(1, 9)]
    names = [w.snapshot(1, states[0]), w.segment(2, states[0], states[1:4])]
    names.append(w.segment(5, states[3], states[4:8]))
    return states, names


def test_verify_proves_a_good_replica_and_names_a_bad_object(tmp_path: Path) -> None:
    root = tmp_path / "replica"
    states, names = _good_replica(root)
    report = _verify(root)
    assert report.ok
    assert report.target_txid == 8
    assert report.checksum == PageHashes.build(PAGE, enumerate(states[7], 1)).checksum
    assert report.checks == 1 + 3 + 1 + 4 + 1
    assert (
        _verify(root, target_txid=3).checksum
        == PageHashes.build(PAGE, enumerate(states[2], 1)).checksum
    )
    # Forged pages under a valid name and header: the checksum after its first TXID gives it away.
    header, txns = decode_object((root / names[1].key).read_bytes())
    forged = _db_pages(40)
    bad = [Transaction(t.info, [(p, forged[p - 1]) for p, _ in t.pages], t.checksum) for t in txns]
    (root / names[1].key).write_bytes(encode_object(header, bad))
    with pytest.raises(FormatError, match=rf"{names[1].key}.*after TXID 2"):
        _verify(root)


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped"])
def test_verify_command_fails_naming_the_damage(tmp_path: Path, damage: str) -> None:
    from tests.procs import replicad

    root = tmp_path / "replica"
    _, names = _good_replica(root)
    assert replicad("verify", root.as_uri()).returncode == 0
    victim = root / names[1].key
    data = victim.read_bytes()
    if damage == "missing":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.write_bytes(data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
    result = replicad("verify", root.as_uri())
    assert result.returncode == 1, result.stdout
    expected = "no segment starts at TXID 2" if damage == "missing" else names[1].key
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
