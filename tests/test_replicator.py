"""The sync step and continuity rules, driven step by step against a local-directory replica."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from replicad.clients.file import FileReplicaClient
from replicad.db import CapturedTxn, Database
from replicad.errors import ReplicaUnavailableError, StateError
from replicad.pidfile import IDENTITY_NAME
from replicad.position import WalPosition, parse_key
from replicad.replica import Replica
from replicad.replicator import DatabaseReplicator
from replicad.testing import ReplicatorHarness as Harness
from tests import workload
from tests.procs import clean_env, wait_for_async


def insert(conn: sqlite3.Connection, n: int, size: int = 200) -> None:
    for i in range(n):
        conn.execute("INSERT INTO t(v, b) VALUES (?, ?)", (f"row{i}", os.urandom(size)))


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


async def test_sync_captures_each_commit_once(h: Harness) -> None:
    app = h.app()
    insert(app, 5)
    rep = await h.start()
    insert(app, 7)
    result = await rep.sync_step()
    assert result is not None
    assert [t.txid for t in result.transactions] == list(range(2, 9))
    again = await rep.sync_step()
    assert again is not None
    assert again.transactions == []
    await h.step()
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)


def _checkpoint_in_other_process(db: Path, mode: str) -> subprocess.Popen[str]:
    code = (
        "import sqlite3,sys,time;"
        "c=sqlite3.connect(sys.argv[1], timeout=10);"
        "t=time.monotonic();"
        f"r=c.execute('PRAGMA wal_checkpoint({mode})').fetchone();"
        "print(r[0], r[1], r[2], round(time.monotonic()-t, 3))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE, text=True, env=clean_env()
    )


@pytest.mark.parametrize("mode", ["PASSIVE", "FULL", "RESTART", "TRUNCATE"])
async def test_external_checkpoint_keeps_continuity(h: Harness, mode: str) -> None:
    """Another process checkpoints while we keep syncing: it completes and nothing is lost."""
    app = h.app()
    insert(app, 40)
    rep = await h.start()
    insert(app, 40)
    await h.step()
    proc = _checkpoint_in_other_process(h.db_path, mode)
    while proc.poll() is None:
        await h.step()  # each step leapfrogs the read mark, letting the checkpoint finish
        await asyncio.sleep(0.02)
    busy, _log, _ckpt, seconds = proc.communicate()[0].split()
    assert busy == "0", f"{mode} checkpoint was blocked"
    assert float(seconds) < 2.0
    if mode == "TRUNCATE":
        assert h.db_path.with_name("app.db-wal").stat().st_size == 0
    insert(app, 30)  # in RESTART/TRUNCATE modes this write restarts the WAL
    await h.step()
    assert rep.stats.continuity_losses == 0
    assert h.snapshots() == 1
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)


async def test_app_autocheckpoint_restarts_do_not_lose_continuity(h: Harness) -> None:
    app = h.app(autocheckpoint=20)
    rep = await h.start()
    for _ in range(30):
        insert(app, 10, size=3000)
        await h.step()
    assert rep.stats.continuity_losses == 0
    # The WAL was restarted many times (autocheckpoint at 20 pages) yet stayed small.
    assert h.db_path.with_name("app.db-wal").stat().st_size < 4 << 20
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)


async def test_replaced_database_file_is_detected(h: Harness) -> None:
    app = h.app()
    insert(app, 10)
    rep = await h.start()
    await h.step()
    other = h.tmp / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE restored_backup(x)")
    conn.execute("INSERT INTO restored_backup VALUES (42)")
    conn.commit()
    conn.close()
    os.replace(other, h.db_path)
    await h.step()
    assert rep.stats.continuity_losses == 1
    assert h.snapshots() == 2
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)


async def test_wal_truncated_while_down_takes_snapshot(h: Harness) -> None:
    app = h.app()
    insert(app, 10)
    await h.start()
    await h.step()
    h.stop()
    insert(app, 10)
    assert app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    insert(app, 5)
    await h.start()
    assert h.snapshots() == 2
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)


async def test_resume_over_unchanged_wal_takes_no_snapshot(h: Harness) -> None:
    app = h.app()
    insert(app, 10)
    await h.start()
    insert(app, 10)
    await h.step()
    h.stop()
    insert(app, 10)  # written while replicad was down; the WAL still holds it
    rep = await h.start()
    assert h.snapshots() == 1
    await h.step()
    assert rep.stats.transactions == 10
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)


async def test_transaction_larger_than_a_read_chunk(h: Harness) -> None:
    app = h.app()
    await h.start()
    app.execute("BEGIN")
    insert(app, 12, size=900_000)  # ~11 MB in one commit; reads are 4 MB
    app.execute("COMMIT")
    await h.step()
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)


async def test_uncommitted_spilled_frames_are_never_shipped(h: Harness) -> None:
    app = h.app()
    insert(app, 3)
    rep = await h.start()
    app.execute("PRAGMA cache_size=5")  # force the big transaction to spill into the WAL
    app.execute("BEGIN")
    insert(app, 200, size=4000)
    result = await rep.sync_step()
    assert result is not None
    assert result.transactions == []
    app.execute("ROLLBACK")
    insert(app, 2)
    await h.step()
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)


async def test_large_transaction_is_spooled_not_held(h: Harness) -> None:
    h.spill_bytes = 256 << 10
    app = h.app()
    insert(app, 3)
    rep = await h.start()
    app.execute("BEGIN")
    insert(app, 300, size=5000)  # ~2.4 MB: ten times the spill size
    app.execute("UPDATE t SET v = 'again' WHERE id <= 50")  # pages written twice: newest wins
    app.execute("COMMIT")
    insert(app, 2)  # small transactions after it are still captured in memory
    result = await rep.sync_step()
    assert result is not None
    assert [t.spooled for t in result.transactions] == [True, False, False]
    # The spool file has no name (the state directory holds only the database's identity).
    assert os.listdir(h.tmp / "state") == [IDENTITY_NAME]
    for replica in rep.replicas:
        await replica.upload()
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)
    # A snapshot now takes those pages from the WAL, where the spooled capture indexed them.
    await rep.snapshot_step(everyone=True)
    for replica in rep.replicas:
        await replica.upload()
    assert h.snapshots() == 2
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)


async def test_large_transaction_rolled_back_and_rewritten(h: Harness) -> None:
    """A spilled transaction that is rolled back leaves frames a new one overwrites."""
    h.spill_bytes = 128 << 10
    app = h.app()
    insert(app, 3)
    rep = await h.start()
    app.execute("PRAGMA cache_size=5")  # the open transaction spills its pages into the WAL
    app.execute("BEGIN")
    insert(app, 400, size=4000)
    result = await rep.sync_step()
    assert result is not None
    assert result.transactions == []
    app.execute("ROLLBACK")
    app.execute("BEGIN")
    insert(app, 300, size=3000)
    app.execute("COMMIT")
    result = await rep.sync_step()
    assert result is not None
    assert [t.spooled for t in result.transactions] == [True]
    for replica in rep.replicas:
        await replica.upload()
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)


async def test_full_state_directory_fails_the_sync_and_loses_nothing(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.spill_bytes = 128 << 10
    app = h.app()
    insert(app, 3)
    rep = await h.start()
    app.execute("BEGIN")
    insert(app, 200, size=4000)
    app.execute("COMMIT")
    real_pwrite = os.pwrite

    def no_space(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", no_space)
    with pytest.raises(StateError, match="no space left in the state directory"):
        await rep.sync_step()
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    await h.step()  # space again: the transaction is still in the WAL and is captured now
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)


async def test_resume_over_a_large_transaction_takes_no_snapshot(h: Harness) -> None:
    h.spill_bytes = 128 << 10
    app = h.app()
    insert(app, 3)
    await h.start()
    app.execute("BEGIN")
    insert(app, 200, size=4000)
    app.execute("COMMIT")
    await h.step()
    h.stop()
    insert(app, 2)
    await h.start()
    await h.step()
    assert h.snapshots() == 1
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)


async def test_failing_replica_never_blocks_another(h: Harness) -> None:
    """Two replicas; one breaks. The other keeps receiving everything, in its own loop."""
    app = h.app()
    insert(app, 5)
    good = Replica("good", FileReplicaClient(h.replica_dir))
    bad_dir = h.tmp / "bad"
    bad = Replica("bad", FileReplicaClient(bad_dir))
    rep = DatabaseReplicator(
        Database(h.db_path), [good, bad], name="app", state_dir=h.tmp / "s", sync_interval=0
    )
    await rep.start()
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(rep.sync_loop(stop))
        tg.create_task(rep.upload_loop(good, stop))
        tg.create_task(rep.upload_loop(bad, stop))
        await wait_for_async(
            lambda: good.shipped_txid >= 1 and bad.shipped_txid >= 1, 10, "both first snapshots"
        )
        bad_dir.rename(h.tmp / "bad-moved")
        bad_dir.write_text("now a file: every write fails")
        base = good.shipped_txid
        for batch in range(1, 11):
            insert(app, 3)
            rep.wake.set()
            target = base + 3 * batch
            # The good replica ships each batch while the bad one fails beside it.
            await wait_for_async(functools.partial(_shipped, good, target), 10, f"TXID {target}")
        assert not good.has_work
        assert bad.has_work
        assert bad.shipped_txid == base
        stop.set()
        rep.interrupt()
    problems = await rep.flush(asyncio.get_running_loop().time() + 0.5)
    assert problems == ["app -> bad: 30 transactions not uploaded"]
    rep.close()
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)


def _shipped(replica: Replica, txid: int) -> bool:
    return replica.shipped_txid >= txid


class _GatedClient(FileReplicaClient):
    """A local-directory replica whose PUTs wait until `gate` is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def put_object(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        self.started.set()
        await self.gate.wait()
        await super().put_object(key, data, create_only=create_only)


def _txn(txid: int, pages: int) -> CapturedTxn:
    end = WalPosition(1, 2, 32 + txid * 4120, txid, txid)
    return CapturedTxn(
        txid, txid * 1000, pages, [(p, bytes(4096)) for p in range(1, pages + 1)], end, 0, 0
    )


async def test_backlog_dropped_during_an_upload_is_not_popped_twice(tmp_path: Path) -> None:
    client = _GatedClient(tmp_path / "replica")
    replica = Replica("r", client, max_pending_bytes=64 << 10)
    await replica.load_tip()
    replica.align(0, 4096)
    replica.enqueue([_txn(1, 40)])  # one transaction above the bound is not a backlog
    assert replica.needs_snapshot is None
    upload = asyncio.create_task(replica.upload())
    await client.started.wait()
    replica.enqueue([_txn(2, 10), _txn(3, 10)])  # behind it: 80 KiB, over the 64 KiB bound
    assert replica.needs_snapshot == "backlog exceeded max_pending_bytes"
    client.gate.set()
    assert await upload == 1
    assert replica.shipped_txid == 1
    assert not replica.pending
    assert replica.pending_bytes == 0
    assert replica.snapshot_txid(3) == 2  # the snapshot continues right after what shipped


class _LostResponseClient(FileReplicaClient):
    """The first PUT lands but its caller sees a failure, as when a response is lost."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lose_next = True

    async def put_object(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        await super().put_object(key, data, create_only=create_only)
        if self.lose_next:
            self.lose_next = False
            raise ReplicaUnavailableError("connection dropped before the response")


async def test_failed_upload_is_retried_as_the_same_segment(tmp_path: Path) -> None:
    """A retry that re-batched would write a second segment starting at the same TXID; restores
    stopping inside the longer one found a dead end at the shorter one (crash soak, 897481133).
    """
    client = _LostResponseClient(tmp_path / "replica")
    replica = Replica("r", client)
    await replica.load_tip()
    replica.align(0, 4096)
    replica.enqueue([_txn(1, 2), _txn(2, 2)])
    with pytest.raises(ReplicaUnavailableError):
        await replica.upload()
    replica.enqueue([_txn(3, 2), _txn(4, 2)])  # commits keep coming while it retries
    assert await replica.upload() == 2
    keys = [info.key for info in await client.list_objects("segments/")]
    assert [(n.first_txid, n.last_txid) for n in map(parse_key, keys) if n] == [(1, 2), (3, 4)]


async def test_snapshot_requested_before_the_first_one_is_uploaded(h: Harness) -> None:
    """A second snapshot for a replica still holding an un-uploaded one gets the same replica
    TXID.  When spool paths were named by TXID it overwrote the first, and offering it released
    the first, deleting the new file: the sync step failed (replica down for longer than
    `snapshot_interval`, or `replicad snapshot` while it was down).
    """
    app = h.app()
    insert(app, 3)
    replica = Replica("r", FileReplicaClient(h.replica_dir))
    rep = DatabaseReplicator(
        Database(h.db_path), [replica], name="app", state_dir=h.tmp / "state", sync_interval=0
    )
    await rep.start()  # the first snapshot is spooled; the replica has not taken it yet
    insert(app, 2)
    rep.request_snapshot()
    await rep.sync_step()
    assert await replica.upload() >= 1
    rep.close()
    assert workload.dump(await h.restored()) == workload.dump(h.db_path)
