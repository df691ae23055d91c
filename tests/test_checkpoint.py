"""Checkpoints driven by replicad keep the WAL bounded without losing continuity."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from replicad.checkpoint import CheckpointPolicy
from replicad.clients.file import FileReplicaClient
from replicad.db import Database
from replicad.replica import Replica
from replicad.replicator import DatabaseReplicator
from replicad.restore import restore
from tests import workload
from tests.procs import replicad, start_daemon, start_writer, stop, wait_for

#: The workload's VACUUMs rewrite the whole database into the WAL, so no fixed size bounds it;
#: the WAL is compared with the same writer's WAL when no replicad runs at all.
ALLOWED_FACTOR = 2.0


def _peak_wal_while(proc_done: threading.Event, wal: Path, peak: list[int]) -> None:
    while not proc_done.wait(0.01):
        with contextlib.suppress(FileNotFoundError):
            peak[0] = max(peak[0], wal.stat().st_size)


@pytest.fixture(scope="module")
def baseline_peak(tmp_path_factory: pytest.TempPathFactory) -> int:
    """Peak WAL of the same writer with no replicad (the application's autocheckpoint only)."""
    tmp = tmp_path_factory.mktemp("baseline")
    conn = sqlite3.connect(tmp / "app.db")
    workload.setup(conn)
    conn.close()
    done, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_peak_wal_while, args=(done, tmp / "app.db-wal", peak))
    sampler.start()
    writer = start_writer(tmp / "app.db", tmp / "w.log", seed=31, count=2400, rate=400)
    assert writer.wait(timeout=60) == 0
    done.set()
    sampler.join()
    return peak[0]


def _run(tmp: Path, *, app_autocheckpoint: int | None, checkpoint_pages: int) -> int:
    """Daemon + 2,400 commits at 400/s from another process; returns the peak WAL size."""
    db, rep = tmp / "app.db", tmp / "replica"
    conn = sqlite3.connect(db)
    workload.setup(conn)
    conn.close()
    config = tmp / "c.toml"
    config.write_text(
        f"[[databases]]\npath = '{db}'\ncheckpoint_pages = {checkpoint_pages}\n"
        f"[[databases.replicas]]\nurl = '{rep.as_uri()}'\n"
    )
    daemon = start_daemon(["-c", str(config)], tmp / "d.log")
    done, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_peak_wal_while, args=(done, tmp / "app.db-wal", peak))
    try:
        wait_for(lambda: any((rep / "snapshots").glob("*.snap")), 20, "first snapshot")
        sampler.start()
        writer = start_writer(
            db, tmp / "w.log", seed=31, count=2400, rate=400, autocheckpoint=app_autocheckpoint
        )
        assert writer.wait(timeout=60) == 0
    finally:
        done.set()
        status = stop(daemon)
    assert status == 0
    out = tmp / "out.db"
    result = replicad("restore", "-o", str(out), rep.as_uri())
    assert result.returncode == 0, result.stderr
    assert workload.integrity(out) == "ok"
    assert workload.dump(out) == workload.dump(db)
    return peak[0]


@pytest.mark.parametrize("app_autocheckpoint", [None, 0], ids=["app-autocheckpoint", "app-off"])
def test_wal_stays_bounded(
    tmp_path: Path, app_autocheckpoint: int | None, baseline_peak: int
) -> None:
    peak = _run(tmp_path, app_autocheckpoint=app_autocheckpoint, checkpoint_pages=1000)
    assert peak < ALLOWED_FACTOR * baseline_peak, (peak, baseline_peak)


def test_without_replicad_checkpoints_the_wal_grows(tmp_path: Path, baseline_peak: int) -> None:
    """The control: the application's autocheckpoint alone cannot restart a WAL we read."""
    peak = _run(tmp_path, app_autocheckpoint=None, checkpoint_pages=0)
    assert peak > ALLOWED_FACTOR * baseline_peak, (peak, baseline_peak)


def _app(db_path: Path) -> sqlite3.Connection:
    """The application's connection: WAL mode, autocheckpoint off (replicad checkpoints)."""
    app = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("PRAGMA wal_autocheckpoint=0")
    app.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
    return app


def _replicator(tmp_path: Path, policy: CheckpointPolicy) -> tuple[Replica, DatabaseReplicator]:
    """A file replica and a replicator with `policy`, driven step by step."""
    replica = Replica("r", FileReplicaClient(tmp_path / "rep"))
    rep = DatabaseReplicator(
        Database(tmp_path / "app.db"),
        [replica],
        name="app",
        state_dir=tmp_path / "s",
        sync_interval=0,
        checkpoints=policy,
    )
    return replica, rep


async def test_truncate_at_hard_limit_completes_and_keeps_continuity(tmp_path: Path) -> None:
    db_path = tmp_path / "app.db"
    app = _app(db_path)
    policy = CheckpointPolicy(checkpoint_pages=10, truncate_pages=50, checkpoint_timeout=2.0)
    replica, rep = _replicator(tmp_path, policy)
    await rep.start()
    for _ in range(3):
        for _ in range(60):
            app.execute("INSERT INTO t(b) VALUES (?)", (os.urandom(3000),))
        await rep.sync_step()
        result = await rep.checkpoint_step()
        assert result is not None
        assert result.mode == "TRUNCATE"
        assert not result.busy
        assert result.seconds < 1.0
        assert (tmp_path / "app.db-wal").stat().st_size == 0
        await replica.upload()
    assert rep.stats.continuity_losses == 0
    assert rep.stats.checkpoints == {"TRUNCATE": 3}
    rep.close()
    await restore(FileReplicaClient(tmp_path / "rep"), tmp_path / "out.db")
    assert workload.dump(tmp_path / "out.db") == workload.dump(db_path)


def test_policy_thresholds() -> None:
    policy = CheckpointPolicy(checkpoint_pages=1000, checkpoint_interval=60, truncate_pages=10000)
    assert policy.mode_for(0, 1000) is None
    assert policy.mode_for(999, 1) is None
    assert policy.mode_for(1000, 1) == "PASSIVE"
    assert policy.mode_for(5, 61) == "PASSIVE"
    assert policy.mode_for(10000, 1) == "TRUNCATE"
    assert CheckpointPolicy(checkpoint_pages=0).mode_for(50000, 1000) is None


async def test_long_reader_makes_truncate_back_off(tmp_path: Path) -> None:
    """A reader in the app pins the WAL: TRUNCATE gives up once, then PASSIVE until the interval."""
    db_path = tmp_path / "app.db"
    app = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("PRAGMA wal_autocheckpoint=0")
    app.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
    app.execute("INSERT INTO t(b) VALUES (x'00')")
    reader = _start_long_reader(db_path)
    try:
        replica = Replica("r", FileReplicaClient(tmp_path / "rep"))
        policy = CheckpointPolicy(
            checkpoint_pages=10, truncate_pages=50, checkpoint_timeout=0.3, checkpoint_interval=30
        )
        rep = DatabaseReplicator(
            Database(db_path),
            [replica],
            name="app",
            state_dir=tmp_path / "s",
            sync_interval=0,
            checkpoints=policy,
        )
        await rep.start()
        modes = []
        for _ in range(4):
            for _ in range(60):
                app.execute("INSERT INTO t(b) VALUES (?)", (os.urandom(3000),))
            await rep.sync_step()
            result = await rep.checkpoint_step()
            modes.append(None if result is None else (result.mode, result.busy))
        assert modes[0] == ("TRUNCATE", True)
        # Then no TRUNCATE stalls the writers again: PASSIVE, or a pause while nothing copies.
        assert all(m is None or m[0] == "PASSIVE" for m in modes[1:])
        assert any(m is not None for m in modes[1:])
        assert rep.stats.checkpoints_busy >= 1
        assert rep.stats.continuity_losses == 0
        await replica.upload()
        rep.close()
    finally:
        reader.kill()
        reader.wait()
    await restore(FileReplicaClient(tmp_path / "rep"), tmp_path / "out.db")
    assert workload.dump(tmp_path / "out.db") == workload.dump(db_path)


def _start_long_reader(db: Path) -> subprocess.Popen[str]:
    """Another process holding a read transaction open (a long report, a backup tool)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _LONG_READER, str(db)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "reading"
    return proc


_LONG_READER = (
    "import sqlite3,sys,time;"
    "c=sqlite3.connect(sys.argv[1], isolation_level=None);"
    "c.execute('BEGIN'); c.execute('SELECT count(*) FROM t').fetchone();"
    "print('reading', flush=True); time.sleep(60)"
)


async def test_no_repeated_checkpoints_of_an_already_copied_wal(tmp_path: Path) -> None:
    """Once the WAL is copied, idle syncs run no checkpoint until new frames arrive."""
    db_path = tmp_path / "app.db"
    app = _app(db_path)
    _, rep = _replicator(tmp_path, CheckpointPolicy(checkpoint_pages=20, checkpoint_interval=3600))
    await rep.start()
    app.execute("BEGIN")
    for _ in range(40):
        app.execute("INSERT INTO t(b) VALUES (?)", (os.urandom(3000),))
    app.execute("COMMIT")
    await rep.sync_step()
    first = await rep.checkpoint_step()
    assert first is not None
    assert not first.busy
    for _ in range(5):  # idle: nothing new to copy
        await rep.sync_step()
        assert await rep.checkpoint_step() is None
    assert rep.stats.checkpoints == {"PASSIVE": 1}
    rep.close()
