"""`replicad snapshot` requested back to back: a real daemon survives, and requests coalesce."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
from pathlib import Path

from structlog.testing import capture_logs

from replicad.replica import spool_path
from replicad.testing import ReplicatorHarness as Harness
from tests.procs import replicad, start_daemon, stop, wait_for


def _events(log: Path) -> list[str]:
    events = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line)["event"])
    return events


def test_spool_files_are_unique_and_private(tmp_path: Path) -> None:
    """Two snapshots at one TXID get two files: releasing one never deletes the other's."""
    first, second = spool_path(tmp_path, 7), spool_path(tmp_path, 7)
    assert first != second
    assert first.exists()
    assert second.exists()
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert str(os.getpid()) not in first.name  # not guessable from the pid and TXID alone


def test_back_to_back_snapshot_requests_do_not_crash_the_daemon(tmp_path: Path) -> None:
    db, replica, dlog = tmp_path / "app.db", tmp_path / "replica", tmp_path / "daemon.log"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(500)])
    conn.commit()
    conn.close()
    daemon = start_daemon([str(db), replica.as_uri()], dlog)
    try:
        wait_for(lambda: "snapshot uploaded" in _events(dlog), 20, "the first snapshot")
        # The first request's snapshot waits for the next upload slot (sync_interval, 1 s):
        # the second request arrives while it is pending, at the same TXID (no writes between).
        os.kill(daemon.pid, signal.SIGUSR1)
        wait_for(lambda: _events(dlog).count("snapshot taken") == 2, 20, "the requested one")
        os.kill(daemon.pid, signal.SIGUSR1)
        wait_for(lambda: _events(dlog).count("snapshot requested") == 2, 20, "the second request")
        os.kill(daemon.pid, signal.SIGUSR1)
        wait_for(lambda: _events(dlog).count("snapshot requested") == 3, 20, "the third request")
        wait_for(lambda: _events(dlog).count("snapshot uploaded") >= 2, 20, "the upload")
        assert daemon.poll() is None, dlog.read_text()[-3000:]
        # The CLI sends the same signal, found through the pid file.
        result = replicad("snapshot", str(db))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["pid"] == daemon.pid
        wait_for(lambda: _events(dlog).count("snapshot requested") == 4, 20, "the CLI request")
    finally:
        status = stop(daemon)
    events = _events(dlog)
    assert status == 0, dlog.read_text()[-3000:]
    assert "taking a scheduled snapshot" not in events  # nobody scheduled these
    assert "taking a requested snapshot" in events
    assert not list((tmp_path / ".app.db-replicad").glob("*.tmp"))
    out = tmp_path / "restored.db"
    result = replicad("restore", "-o", str(out), replica.as_uri())
    assert result.returncode == 0, result.stderr
    assert sqlite3.connect(out).execute("SELECT count(*) FROM t").fetchone() == (500,)


async def test_a_request_while_one_is_pending_joins_it(tmp_path: Path) -> None:
    """Steps driven by hand, no upload between: the second request takes no second snapshot."""
    harness = Harness(tmp_path)
    harness.app().close()
    rep = await harness.start()
    try:
        with capture_logs() as logs:
            rep.request_snapshot()
            await rep.sync_step()  # taken, offered, not uploaded yet
            pending = rep.replicas[0].snapshot
            assert pending is not None
            assert pending.path.exists()
            rep.request_snapshot()
            await rep.sync_step()
            assert rep.replicas[0].snapshot is pending  # joined, not replaced
            assert pending.path.exists()
            await rep.replicas[0].upload()
        events = [e["event"] for e in logs]
        assert events.count("snapshot taken") == 1
        # Both lines name the snapshot by the TXID the replica holds it as.
        taken = next(e for e in logs if e["event"] == "snapshot taken")
        uploaded = next(e for e in logs if e["event"] == "snapshot uploaded")
        assert taken["txid"] == uploaded["txid"] == pending.name.last_txid
        assert "snapshot requested; joining the one waiting to upload" in events
        assert events.count("snapshot uploaded") == 1
        assert not pending.path.exists()
    finally:
        harness.stop()
