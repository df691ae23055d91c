"""The rough edges an operator met trying replicad as written (issue 19), each pinned down."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import urllib.request
from pathlib import Path

import pytest

from replicad.config import load_config
from replicad.errors import ConfigError
from tests.procs import ROOT, free_port, replicad, start_daemon, stop, wait_for


def _make_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    conn.close()


def _events(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _replicate_until_snapshots(db: Path, replica: Path, log: Path, snapshots: int) -> None:
    """Run the daemon until the replica holds `snapshots` snapshots, then stop it cleanly."""
    daemon = start_daemon([str(db), replica.as_uri()], log)
    try:
        wait_for(
            lambda: len(list((replica / "snapshots").glob("*.snap"))) >= snapshots,
            20,
            f"{snapshots} snapshots",
        )
    finally:
        assert stop(daemon) == 0


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "replicad.toml"
    path.write_text(text)
    return path


# -- configuration -------------------------------------------------------------------------


def test_a_relative_database_path_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    path = _config(
        tmp_path / "etc",
        '[[databases]]\npath = "data/app.db"\nstate_dir = "state"\n'
        '[[databases.replicas]]\nurl = "file:///backups"\n',
    )
    monkeypatch.chdir(ROOT)  # anywhere but the file's directory
    db = load_config(path).databases[0]
    assert db.path == tmp_path / "etc" / "data" / "app.db"
    assert db.state_dir == tmp_path / "etc" / "state"


def test_config_check_warns_about_a_database_that_does_not_exist(tmp_path: Path) -> None:
    path = _config(
        tmp_path, '[[databases]]\npath = "missing.db"\n[[databases.replicas]]\nurl = "file:///b"\n'
    )
    result = replicad("config", "check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "warning: databases[0].path" in result.stderr
    assert str(tmp_path / "missing.db") in result.stderr
    json.loads(result.stdout)  # stdout stays the configuration, as JSON


def test_config_check_rejects_the_metrics_address_replicate_rejects(tmp_path: Path) -> None:
    body = '[[databases]]\npath = "app.db"\n[[databases.replicas]]\nurl = "file:///b"\n'
    result = replicad(
        "config", "check", "-c", str(_config(tmp_path, f'metrics_addr = "19419"\n{body}'))
    )
    assert result.returncode == 2
    assert "metrics_addr" in result.stderr
    assert "HOST:PORT" in result.stderr
    result = replicad(
        "config", "check", "-c", str(_config(tmp_path, f'metrics_addr = ":9090"\n{body}'))
    )
    assert result.returncode == 0, result.stderr
    assert "http://127.0.0.1:9090/metrics" in result.stderr
    assert "this host only" in result.stderr
    result = replicad(
        "config", "check", "-c", str(_config(tmp_path, f'metrics_addr = "0.0.0.0:9090"\n{body}'))
    )
    assert "other hosts can reach it" in result.stderr


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        (
            '[[databases]]\npath = "a.db"\nmetrics_addr = "127.0.0.1:9090"\n'
            '[[databases.replicas]]\nurl = "file:///b"\n',
            "move it above the first [[databases]]",
        ),
        (
            '[[databases]]\npath = "a.db"\n[[replicas]]\nurl = "file:///b"\n',
            "write [[databases.replicas]] under its [[databases]]",
        ),
        (
            '[[databases]]\npath = "a.db"\nurl = "file:///b"\n',
            "url belongs to a replica: put it under [[databases.replicas]]",
        ),
        (
            '[[databases]]\npath = "a.db"\npoll_intervall = 1\n'
            '[[databases.replicas]]\nurl = "file:///b"\n',
            "did you mean 'poll_interval'? keys accepted here: checkpoint_interval,",
        ),
    ],
)
def test_misplaced_keys_say_where_they_belong(tmp_path: Path, text: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, text), env={})
    assert hint in str(info.value)
    result = replicad("config", "check", "-c", str(tmp_path / "replicad.toml"))
    assert result.returncode == 2
    assert hint in result.stderr


# -- one-shot commands ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ls", "status"])
def test_ls_on_a_replica_that_does_not_exist_fails_with_restores_hint(
    tmp_path: Path, command: str
) -> None:
    url = (tmp_path / "nothing-here").as_uri()
    result = replicad(command, url)
    restore = replicad("restore", "-o", str(tmp_path / "x.db"), url)
    assert result.returncode != 0
    assert "holds no replicad objects" in result.stderr
    hint = [line for line in restore.stderr.splitlines() if "hint" in line]
    assert hint
    assert hint[0] in result.stderr


def test_dry_run_needs_no_output_and_shows_the_commit_time(tmp_path: Path) -> None:
    db, replica, log = tmp_path / "app.db", tmp_path / "replica", tmp_path / "d.log"
    _make_db(db)
    _replicate_until_snapshots(db, replica, log, 1)
    result = replicad("restore", "--dry-run", replica.as_uri())
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}\+00:00", plan["target_committed"])
    result = replicad("restore", replica.as_uri())
    assert result.returncode != 0
    assert "restore needs -o OUT" in result.stderr


# -- the daemon ----------------------------------------------------------------------------


def test_the_daemon_logs_its_metrics_address_and_counters_start_at_zero(tmp_path: Path) -> None:
    db, replica, log = tmp_path / "app.db", tmp_path / "replica", tmp_path / "d.log"
    _make_db(db)
    port = free_port()
    daemon = start_daemon([str(db), replica.as_uri(), "--metrics-addr", f"127.0.0.1:{port}"], log)
    try:
        wait_for(lambda: any(e["event"] == "serving metrics" for e in _events(log)), 20, "metrics")
        served = next(e for e in _events(log) if e["event"] == "serving metrics")
        assert served["url"] == f"http://127.0.0.1:{port}/metrics"
        # No proxy from this machine's environment between the test and 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(str(served["url"]), timeout=10) as response:
            body = response.read().decode()
    finally:
        assert stop(daemon) == 0
    for series in (
        'replicad_replica_errors_total{db="app",kind="access",replica="file0"} 0.0',
        'replicad_replica_errors_total{db="app",kind="unavailable",replica="file0"} 0.0',
        'replicad_checkpoints_total{db="app",mode="TRUNCATE"}',
        'replicad_replica_requests_total{db="app",operation="DELETE",replica="file0"}',
    ):
        assert series in body, series


def test_no_lease_remark_after_a_clean_release_but_one_after_a_crash(tmp_path: Path) -> None:
    db, replica, log = tmp_path / "app.db", tmp_path / "replica", tmp_path / "d.log"
    _make_db(db)
    remark = "lease left by an earlier daemon for this database on this host; claiming it"

    def run(nth: int, sig: int) -> None:
        daemon = start_daemon([str(db), replica.as_uri()], log)
        try:
            wait_for(lambda: _settled(log, nth), 20, f"start {nth} to settle")
        finally:
            stop(daemon, sig)

    run(1, signal.SIGTERM)
    run(2, signal.SIGTERM)  # after a clean release: nothing to remark on
    assert not any(e["event"] == remark for e in _events(log))
    run(3, signal.SIGKILL)
    run(4, signal.SIGTERM)  # after a crash the lease was never released: claimed, and said so
    assert sum(e["event"] == remark for e in _events(log)) == 1


def _settled(log: Path, nth: int) -> bool:
    """The `nth` daemon has started and finished starting (its snapshot or resume logged)."""
    events = _events(log)
    starts = [i for i, e in enumerate(events) if e["event"] == "starting"]
    if len(starts) < nth:
        return False
    return any(
        e["event"] in ("snapshot uploaded", "resumed from replica")
        for e in events[starts[nth - 1] :]
    )


def test_a_snapshot_after_the_database_was_replaced_says_so(tmp_path: Path) -> None:
    db, replica, log = tmp_path / "app.db", tmp_path / "replica", tmp_path / "d.log"
    _make_db(db)
    _replicate_until_snapshots(db, replica, log, 1)
    other = tmp_path / "other.db"
    _make_db(other)
    _make_db(other)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    os.replace(other, db)
    _replicate_until_snapshots(db, replica, log, 2)
    reasons = [e.get("reason") for e in _events(log) if e["event"] == "taking a snapshot"]
    assert reasons[-1] == "the database file was replaced while replicad was not running"
