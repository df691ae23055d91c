"""The command line as an operator meets it: exit codes, messages and hints, no tracebacks."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest

from tests import workload
from tests.procs import replicad, start_daemon, stop, wait_for


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A replica with a little history, made by a real daemon run."""
    tmp = tmp_path_factory.mktemp("cli")
    db, rep = tmp / "app.db", tmp / "replica"
    conn = sqlite3.connect(db, isolation_level=None)
    workload.setup(conn)
    daemon = start_daemon([str(db), rep.as_uri()], tmp / "daemon.log")
    wait_for(lambda: any((rep / "snapshots").glob("*.snap")), 20, "first snapshot")
    for k in range(1, 30):
        workload.apply_txn(conn, 5, k)
    conn.close()
    assert stop(daemon) == 0
    return rep


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text


def test_restore_refuses_existing_target(replica: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.db"
    out.write_bytes(b"precious")
    result = replicad("restore", "-o", str(out), replica.as_uri())
    assert result.returncode == 1
    assert "already exists" in result.stderr
    assert "--force" in result.stderr
    _no_traceback(result.stderr)
    assert out.read_bytes() == b"precious"


def test_restore_force_replaces_and_removes_stale_wal(replica: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.db"
    out.write_bytes(b"old")
    stale_wal = tmp_path / "out.db-wal"
    stale_wal.write_bytes(b"x" * 5000)
    (tmp_path / "out.db-shm").write_bytes(b"y" * 100)
    result = replicad("restore", "--force", "-o", str(out), replica.as_uri())
    assert result.returncode == 0, result.stderr
    assert not stale_wal.exists()
    assert workload.integrity(out) == "ok"
    assert workload.seq_of(out) == 29


def test_restore_from_empty_or_missing_replica(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "empty", tmp_path / "missing"):
        result = replicad("restore", "-o", str(tmp_path / "o.db"), source.as_uri())
        assert result.returncode == 1
        assert "holds no replicad objects" in result.stderr
        _no_traceback(result.stderr)
    assert not (tmp_path / "o.db").exists()


def test_restore_to_txid(replica: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.db"
    result = replicad("restore", "--txid", "1", "-o", str(out), replica.as_uri())
    assert result.returncode == 0, result.stderr
    assert workload.integrity(out) == "ok"
    assert workload.seq_of(out) == 0


def test_restore_needs_url_or_config(tmp_path: Path) -> None:
    result = replicad("restore", "-o", str(tmp_path / "o.db"), "app.db")
    assert result.returncode == 2
    assert "not a replica URL" in result.stderr


def test_restore_by_database_name_from_config(replica: Path, tmp_path: Path) -> None:
    config = tmp_path / "r.toml"
    config.write_text(
        f"[[databases]]\npath = '/nonexistent/app.db'\nname = 'app'\n"
        f"[[databases.replicas]]\nurl = '{replica.as_uri()}'\nname = 'local'\n"
    )
    out = tmp_path / "c.db"
    result = replicad("restore", "-c", str(config), "--replica", "local", "-o", str(out), "app")
    assert result.returncode == 0, result.stderr
    assert workload.seq_of(out) == 29
    result = replicad("restore", "-c", str(config), "-o", str(out), "other")
    assert result.returncode == 2
    assert "no database 'other'" in result.stderr


def test_replicate_refuses_non_wal_database(tmp_path: Path) -> None:
    db = tmp_path / "rollback.db"
    sqlite3.connect(db).execute("CREATE TABLE t(x)").connection.commit()
    result = replicad("replicate", str(db), (tmp_path / "r").as_uri(), timeout=30)
    assert result.returncode == 1
    assert "not in WAL mode" in result.stderr
    assert "journal_mode=WAL" in result.stderr
    _no_traceback(result.stderr)


def test_replicate_reports_config_errors(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[[databases]]\npath='a.db'\nreplicas=[{url='file:///x', nmae='y'}]\n")
    result = replicad("replicate", "-c", str(config))
    assert result.returncode == 2
    assert f"{config}: databases[0].replicas[0].nmae: unknown key" in result.stderr
    assert "did you mean 'name'" in result.stderr


def test_replicate_waits_for_missing_database_and_stops_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    daemon = start_daemon([str(tmp_path / "later.db"), (tmp_path / "r").as_uri()], log)
    wait_for(lambda: "does not exist yet" in log.read_text(), 20, "waiting message")
    assert stop(daemon, signal.SIGINT) == 0


def test_help_documents_every_flag() -> None:
    result = replicad("restore", "--help")
    for flag in ("--output", "--config", "--replica", "--txid", "--force", "--integrity-check"):
        assert flag in result.stdout
