"""A snapshot once the pages captured since the last one outgrow it (issue 15): the newest
state then restores from at most about twice the database, whatever the snapshot interval.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

import replicad.replicator as replicator_module
from replicad.clients.file import FileReplicaClient
from replicad.db import Database
from replicad.position import ObjectKind
from replicad.replica import Replica
from replicad.replicator import DatabaseReplicator
from replicad.restore import restore
from tests import workload


async def test_snapshot_when_captured_pages_outgrow_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replicator_module, "SNAPSHOT_GROWTH_MIN_BYTES", 0)
    db_path = tmp_path / "app.db"
    app = sqlite3.connect(db_path, isolation_level=None)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
    for _ in range(50):
        app.execute("INSERT INTO t(b) VALUES (?)", (os.urandom(3000),))
    app.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    client = FileReplicaClient(tmp_path / "replica")
    rep = DatabaseReplicator(
        Database(db_path), [Replica("r", client)], name="app", state_dir=tmp_path / "s"
    )
    await rep.start()
    await rep.sync_step()
    await rep.replicas[0].upload()
    assert rep.stats.snapshots == 1
    size = db_path.stat().st_size
    captured = rep.stats.captured_bytes
    rewrites = 0
    while rep.stats.captured_bytes - captured < size:  # one row (a page) per transaction
        assert rep.stats.snapshots == 1, "a snapshot before the segments outgrew the last one"
        rewrites += 1
        app.execute("UPDATE t SET b = ? WHERE id = ?", (os.urandom(3000), 1 + rewrites % 50))
        await rep.sync_step()
        await rep.replicas[0].upload()
    assert rep.stats.snapshots == 2
    await rep.replicas[0].upload()
    rep.close()
    snapshots = [n for n in rep.replicas[0].objects if n.kind is ObjectKind.SNAPSHOT]
    assert len(snapshots) == 2
    out = tmp_path / "out.db"
    await restore(client, out)
    assert workload.dump(out) == workload.dump(db_path)
    app.close()
