"""Retention keeps every moment of the window restorable and deletes only what is older."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from replicad.clients.file import FileReplicaClient
from replicad.db import Database
from replicad.position import ObjectKind, ObjectName, segment_name, snapshot_name
from replicad.replica import Replica
from replicad.replicator import DatabaseReplicator
from replicad.restore import names_from_listing, plan_restore, restore
from replicad.retention import plan_retention
from tests import workload
from tests.conftest import WallClock

HOUR = 3600_000


def seg(first: int, last: int, t: int, level: int = 0) -> ObjectName:
    return segment_name(level=level, first_txid=first, last_txid=last, min_time_ms=t, max_time_ms=t)


def test_nothing_is_deleted_without_a_snapshot_older_than_the_window() -> None:
    now = 100 * HOUR
    names = [snapshot_name(1, now - HOUR), seg(2, 5, now - HOUR), seg(6, 9, now)]
    assert plan_retention(names, now_ms=now, retention=24 * 3600, grace=600) == []


def test_base_snapshot_and_everything_after_it_are_kept() -> None:
    now = 100 * HOUR
    names = [
        snapshot_name(1, now - 50 * HOUR),
        seg(2, 10, now - 49 * HOUR),
        seg(2, 10, now - 49 * HOUR, level=1),
        snapshot_name(10, now - 30 * HOUR),  # base: newest snapshot before the window
        seg(11, 20, now - 26 * HOUR),
        snapshot_name(20, now - 2 * HOUR),
        seg(21, 30, now - HOUR),
    ]
    doomed = plan_retention(names, now_ms=now, retention=24 * 3600, grace=600)
    assert {(n.kind, n.last_txid, n.level) for n in doomed} == {
        (ObjectKind.SEGMENT, 10, 0),
        (ObjectKind.SEGMENT, 10, 1),
        (ObjectKind.SNAPSHOT, 1, 0),
    }
    assert [n.first_txid for n in doomed] == sorted(n.first_txid for n in doomed)
    kept = {n: 1 for n in names if n not in doomed}
    # Every TXID from the base on is still restorable.
    for target in range(10, 31):
        assert plan_restore(kept, target_txid=target).target_txid == target


def test_grace_keeps_what_a_recent_plan_could_need() -> None:
    now = 100 * HOUR
    names = [
        snapshot_name(1, now - 25 * HOUR),
        seg(2, 5, now - 25 * HOUR),
        snapshot_name(5, now - 24 * HOUR - 60_000),
    ]
    assert plan_retention(names, now_ms=now, retention=24 * 3600, grace=600) == []
    assert len(plan_retention(names, now_ms=now, retention=24 * 3600, grace=0)) == 2


async def test_scheduled_snapshots_and_retention_keep_the_window_restorable(
    tmp_path: Path, wall_clock: WallClock
) -> None:
    db_path = tmp_path / "app.db"
    app = sqlite3.connect(db_path, isolation_level=None)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
    client = FileReplicaClient(tmp_path / "rep")
    replica = Replica("r", client, retention=0.3, retention_grace=0)
    rep = DatabaseReplicator(
        Database(db_path),
        [replica],
        name="app",
        state_dir=tmp_path / "s",
        sync_interval=0,
        snapshot_interval=0.2,
    )
    await rep.start()
    await replica.upload()  # the first snapshot, as the upload loop would ship it at once
    for _ in range(6):
        wall_clock.advance(0.25)  # each step: one snapshot interval and a bit
        app.execute("INSERT INTO t(b) VALUES (?)", (os.urandom(500),))
        await rep.sync_step()
        await replica.upload()
        await replica.enforce_retention()
    rep.close()
    listed = names_from_listing(await client.list_objects())
    assert set(listed) == set(replica.objects), "the inventory matches the bucket"
    snapshots = sorted(n for n in listed if n.kind is ObjectKind.SNAPSHOT)
    assert rep.stats.snapshots == 7, "the first one, then one per step"
    # Snapshot k+1 was taken at step k (0.25 s apart).  The window is 0.3 s: its base is the
    # newest snapshot at least 0.3 s old, taken two steps (0.5 s) ago; it, the one after it and
    # the newest are kept, every older one is deleted.
    assert [n.last_txid for n in snapshots] == [5, 6, 7]
    segments = [n for n in listed if n.kind is ObjectKind.SEGMENT]
    assert min(n.first_txid for n in segments) > 5, "segments up to the base were deleted"
    await restore(client, tmp_path / "out.db")
    assert workload.dump(tmp_path / "out.db") == workload.dump(db_path)


async def test_compaction_in_the_replica_keeps_every_txid_restorable(
    tmp_path: Path, wall_clock: WallClock
) -> None:
    db_path = tmp_path / "app.db"
    app = sqlite3.connect(db_path, isolation_level=None)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
    client = FileReplicaClient(tmp_path / "rep")
    replica = Replica("r", client, compaction_levels=(0.2, 0.6), compaction_settle_ms=50)
    rep = DatabaseReplicator(
        Database(db_path), [replica], name="app", state_dir=tmp_path / "s", sync_interval=0
    )
    await rep.start()
    states = {}
    for i in range(24):
        app.execute("INSERT INTO t(b) VALUES (?)", (os.urandom(300),))
        app.execute("UPDATE t SET b = ? WHERE id = 1", (os.urandom(100),))
        await rep.sync_step()
        await replica.upload()
        states[replica.shipped_txid] = workload.dump(db_path)
        wall_clock.advance(0.05)
        if i % 6 == 5:
            await replica.compact()
    wall_clock.advance(0.7)  # every bucket of both levels has closed and settled
    await replica.compact()
    await replica.compact()
    rep.close()
    levels = {n.level for n in names_from_listing(await client.list_objects())}
    assert {0, 1, 2} <= levels
    plan = plan_restore(replica.objects)
    level0 = [n for n in replica.objects if n.kind is ObjectKind.SEGMENT and n.level == 0]
    assert len(level0) >= 20
    assert len(plan.objects) <= len(level0) // 3, "restore reads compacted segments"
    for txid, state in states.items():
        out = tmp_path / f"o{txid}.db"
        await restore(client, out, target_txid=txid)
        assert workload.dump(out) == state, txid


async def test_restore_streams_large_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects above STREAM_ABOVE are streamed rather than held whole; the result is the same."""
    import replicad.restore.download as download_module

    db_path = tmp_path / "app.db"
    app = sqlite3.connect(db_path, isolation_level=None)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
    client = FileReplicaClient(tmp_path / "rep")
    replica = Replica("r", client)
    rep = DatabaseReplicator(
        Database(db_path), [replica], name="app", state_dir=tmp_path / "s", sync_interval=0
    )
    await rep.start()
    for _ in range(5):
        app.execute("INSERT INTO t(b) VALUES (?)", (os.urandom(20000),))
        await rep.sync_step()
        await replica.upload()
    rep.close()
    monkeypatch.setattr(download_module, "STREAM_ABOVE", 1)
    monkeypatch.setattr(download_module, "FEED_BYTES", 777)
    await restore(client, tmp_path / "out.db")
    assert workload.dump(tmp_path / "out.db") == workload.dump(db_path)
