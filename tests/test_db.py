"""`Database` on its own: opening, capturing commits from the WAL, resuming, snapshots."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicad.db import Database, SnapshotSource, SyncResult
from replicad.errors import DatabaseError
from replicad.position import WalPosition

ROW = 300


def _app(path: Path) -> sqlite3.Connection:
    """The application: WAL mode, no autocheckpoint (the tests decide when the WAL restarts)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, b BLOB)")
    return conn


def _insert(conn: sqlite3.Connection, n: int, size: int = ROW) -> None:
    """`n` transactions of one row each."""
    for _ in range(n):
        conn.execute("INSERT INTO t(b) VALUES (?)", (os.urandom(size),))


def _sync(db: Database) -> SyncResult:
    """Sync until the WAL is captured; all the transactions found."""
    result = db.sync()
    found = list(result.transactions)
    while result.more:
        result = db.sync()
        found += result.transactions
    return SyncResult(found, result.lost_continuity, False, result.wal_size)


def _fresh(db: Database) -> SnapshotSource:
    """Start fresh as the replicator does: the jump to TXID 1, then the page hashes of it."""
    source = db.start_fresh(base_txid=0)
    db.adopt_hashes(db.page_hashes(source))
    return source


def _captured(db: Database, app: sqlite3.Connection, n: int) -> WalPosition:
    """Start fresh, commit `n` transactions and capture them; the position reached."""
    _fresh(db)
    _insert(app, n)
    _sync(db)
    assert db.state.position is not None
    return db.state.position


@pytest.fixture
def app(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = _app(tmp_path / "app.db")
    yield conn
    conn.close()


@pytest.fixture
def db(tmp_path: Path, app: sqlite3.Connection) -> Iterator[Database]:
    database = Database(tmp_path / "app.db", spill_dir=tmp_path / "spill")
    database.open()
    yield database
    database.close()


def test_missing_file_is_refused_with_guidance(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="does not exist") as info:
        Database(tmp_path / "missing.db").open()
    assert "start the application" in (info.value.hint or "")


def test_not_sqlite_and_not_wal_are_refused(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello " * 100)
    with pytest.raises(DatabaseError, match="not a SQLite database"):
        Database(notes).open()
    rollback = tmp_path / "rollback.db"
    sqlite3.connect(rollback).execute("CREATE TABLE t(x)").connection.close()
    with pytest.raises(DatabaseError, match="not in WAL mode") as info:
        Database(rollback).open()
    assert "journal_mode=WAL" in (info.value.hint or "")


def test_sync_needs_a_position_first(db: Database) -> None:
    with pytest.raises(RuntimeError, match="position"):
        db.sync()


def test_each_commit_is_captured_once_in_order(db: Database, app: sqlite3.Connection) -> None:
    _insert(app, 3)
    source = _fresh(db)
    assert source.txid == 1, "what the WAL held at start is one jump to TXID 1"
    _insert(app, 5)
    first = _sync(db)
    assert [t.txid for t in first.transactions] == [2, 3, 4, 5, 6]
    assert first.lost_continuity is None
    times = [t.commit_time_ns for t in first.transactions]
    assert times == sorted(times)
    assert all(t.pages and t.db_pages >= 2 for t in first.transactions)
    assert _sync(db).transactions == [], "nothing new: nothing captured twice"
    _insert(app, 2)
    assert [t.txid for t in _sync(db).transactions] == [7, 8]


def test_a_sync_step_stops_at_its_byte_budget(tmp_path: Path, app: sqlite3.Connection) -> None:
    db = Database(tmp_path / "app.db", max_sync_bytes=8 * 4096, spill_dir=tmp_path)
    db.open()
    try:
        _fresh(db)
        _insert(app, 40)
        step = db.sync()
        assert step.more, "40 commits of a page or more do not fit in 8 pages of budget"
        assert 0 < len(step.transactions) < 40
        rest = _sync(db)
        assert [t.txid for t in step.transactions + rest.transactions] == list(range(2, 42))
    finally:
        db.close()


def test_snapshot_pages_are_the_database_as_sqlite_sees_it(
    db: Database, app: sqlite3.Connection
) -> None:
    _insert(app, 20)
    app.execute("DELETE FROM t WHERE id % 3 = 0")  # frees pages: the file is not just appended
    source = _fresh(db)
    pages = list(db.iter_snapshot_pages(source))
    assert [pgno for pgno, _ in pages] == list(range(1, source.db_pages + 1))
    # The state lives in the WAL (never checkpointed): the file alone would be stale.
    assert b"".join(data for _, data in pages) == app.serialize()


def test_snapshot_after_sync_matches_the_newest_commit(
    db: Database, app: sqlite3.Connection
) -> None:
    _fresh(db)
    _insert(app, 10)
    _sync(db)
    source = db.current_source()
    assert source.txid == 11
    image = b"".join(data for _, data in db.iter_snapshot_pages(source))
    assert image == app.serialize()


def test_resume_continues_from_a_recorded_position(
    tmp_path: Path, db: Database, app: sqlite3.Connection
) -> None:
    position = _captured(db, app, 4)
    txid, pages = db.state.txid, db.state.db_pages
    db.close()
    _insert(app, 3)  # committed while replicad was not running
    again = Database(tmp_path / "app.db", spill_dir=tmp_path / "spill")
    again.open()
    try:
        assert again.resume(position, txid=txid, db_pages=pages) is None
        assert [t.txid for t in _sync(again).transactions] == [6, 7, 8]
    finally:
        again.close()


def test_resume_refuses_a_wal_restarted_meanwhile(
    tmp_path: Path, db: Database, app: sqlite3.Connection
) -> None:
    position = _captured(db, app, 4)
    db.close()
    app.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    _insert(app, 2)  # a new WAL generation
    again = Database(tmp_path / "app.db")
    again.open()
    try:
        reason = again.resume(position, txid=5, db_pages=db.state.db_pages)
        assert reason is not None
        assert "restarted" in reason
    finally:
        again.close()


def test_a_replaced_file_loses_continuity(
    tmp_path: Path, db: Database, app: sqlite3.Connection
) -> None:
    _fresh(db)
    _insert(app, 2)
    _sync(db)
    other = tmp_path / "other.db"
    _app(other).close()
    os.replace(other, tmp_path / "app.db")
    assert db.is_replaced()
    result = db.sync()
    assert result.transactions == []
    assert result.lost_continuity is not None
    assert "replaced" in result.lost_continuity


def test_a_large_transaction_is_spooled_to_disk(tmp_path: Path, app: sqlite3.Connection) -> None:
    spill = tmp_path / "spill"
    db = Database(tmp_path / "app.db", spill_dir=spill, spill_bytes=0)  # the floor applies
    db.open()
    try:
        _fresh(db)
        app.execute("BEGIN")
        _insert(app, 100, size=4000)  # ~400 KB in one transaction, above the 128 KiB floor
        app.execute("COMMIT")
        (txn,) = _sync(db).transactions
        assert txn.spooled
        assert txn.nbytes >= 100 * 4000
        _insert(app, 1)
        (small,) = _sync(db).transactions
        assert not small.spooled
    finally:
        db.close()
