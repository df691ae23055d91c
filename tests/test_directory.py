"""Directory mode with real files and a real daemon process: databases created, written,
removed and re-created while it runs; stray files skipped once; restores by path and by URL.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from replicad.config import load_config
from replicad.errors import ConfigError
from tests.procs import Daemon, replicad, wait_for

WAIT = 60.0


def _config(
    tmp_path: Path,
    directory: Path,
    replica: Path,
    extra: str = "",
    *,
    pattern: str = "*.db",
    top: str = "",
) -> Path:
    replica.mkdir(exist_ok=True)
    path = tmp_path / "replicad.toml"
    path.write_text(
        f"{top}[[directories]]\npath = '{directory}'\npattern = '{pattern}'\n{extra}"
        f"[[directories.replicas]]\nurl = '{replica.as_uri()}'\n"
    )
    return path


def _write(db: Path, values: list[str], *, wal: bool = True) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS t (v TEXT)")
        for value in values:
            conn.execute("INSERT INTO t VALUES (?)", (value,))
    finally:
        conn.close()


def _rows(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [v for (v,) in conn.execute("SELECT v FROM t ORDER BY rowid")]
    finally:
        conn.close()


def _restored(args: list[str], out: Path) -> list[str] | None:
    """The rows of a restore (`replicad restore -o OUT ARGS`), None if it fails."""
    out.unlink(missing_ok=True)
    result = replicad("restore", "-o", str(out), *args)
    return _rows(out) if result.returncode == 0 else None


def _remove(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def _log_lines(log: Path, event: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def test_databases_come_and_go_while_the_daemon_runs(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    replica = tmp_path / "replica"
    _write(tenants / "a.db", ["a1", "a2"])
    (tenants / "notes.db").write_bytes(b"not a database at all\n" * 10)
    _write(tenants / "old.db", ["x"], wal=False)
    config = _config(tmp_path, tenants, replica)
    log = tmp_path / "daemon.log"
    out = tmp_path / "out.db"
    daemon = Daemon.start(["-c", str(config)], log)
    try:
        by_path = ["-c", str(config), str(tenants / "a.db")]
        wait_for(lambda: _restored(by_path, out) == ["a1", "a2"], WAIT, "a.db shipped", log=log)

        _write(tenants / "b.db", ["b1"])  # appears while running
        _write(tenants / "b.db", ["b2", "b3"])
        by_path_b = ["-c", str(config), str(tenants / "b.db")]
        wait_for(
            lambda: _restored(by_path_b, out) == ["b1", "b2", "b3"],
            WAIT,
            "b.db, created while running, shipped",
            log=log,
        )

        _remove(tenants / "a.db")
        wait_for(
            lambda: any(
                line.get("db") == "a.db"
                for line in _log_lines(log, "database removed: flushed and released")
            ),
            WAIT,
            "a.db released",
            log=log,
        )
        _write(tenants / "a.db", ["new"])  # re-created: a new database, shipped from a snapshot
        wait_for(lambda: _restored(by_path, out) == ["new"], WAIT, "a.db re-created", log=log)
        daemon.check_running()
    finally:
        daemon.stop()
    skipped = _log_lines(log, "skipping a file that cannot be replicated")
    assert sorted(str(line["path"]) for line in skipped) == [
        str(tenants / "notes.db"),
        str(tenants / "old.db"),
    ], "each stray file is logged exactly once"
    assert "rollback-journal" in str(next(s for s in skipped if "old" in str(s["path"]))["why"])
    # The prefix of a directory's database is a replica of its own: restore by URL.
    assert _restored([(replica / "b.db").as_uri()], out) == ["b1", "b2", "b3"]
    assert _rows(tenants / "old.db") == ["x"], "a skipped database is left alone"


def test_databases_in_subdirectories_with_recursion(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants"
    (tenants / "eu").mkdir(parents=True)
    replica = tmp_path / "replica"
    _write(tenants / "eu" / "c.db", ["c"])
    _write(tenants / "top.db", ["t"])
    config = _config(tmp_path, tenants, replica, "recursive = true\n")
    log = tmp_path / "daemon.log"
    out = tmp_path / "out.db"
    daemon = Daemon.start(["-c", str(config)], log)
    try:
        wait_for(
            lambda: _restored([(replica / "eu" / "c.db").as_uri()], out) == ["c"],
            WAIT,
            "eu/c.db shipped under <prefix>/eu/c.db",
            log=log,
        )
        wait_for(
            lambda: _restored(["-c", str(config), str(tenants / "top.db")], out) == ["t"],
            WAIT,
            "top.db shipped",
            log=log,
        )
    finally:
        daemon.stop()
    _write(tenants / "cold.db", ["never shipped"], wal=False)
    status = replicad("status", "-c", str(config), "--json")
    assert status.returncode == 0, status.stderr
    rows = {row["db"]: row for row in json.loads(status.stdout)}
    assert sorted(rows) == ["cold.db", "eu/c.db", "top.db"]
    assert rows["eu/c.db"]["txid"] == rows["top.db"]["txid"] == 1
    assert rows["cold.db"]["txid"] is None
    assert rows["cold.db"]["error"]
    text = replicad("status", "-c", str(config)).stdout.splitlines()
    assert len(text) == 4, "a header and one line per database"
    assert text[2].split()[:2] == ["eu/c.db", "1"]


def test_metrics_beyond_the_limit_are_totals(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    for name in ("a", "b", "c"):
        _write(tenants / f"{name}.db", [name])
    config = _config(tmp_path, tenants, tmp_path / "replica", top="metrics_max_databases = 2\n")
    log = tmp_path / "daemon.log"
    daemon = Daemon.start(["-c", str(config)], log)
    try:
        wait_for(
            lambda: daemon.metric("replicad_snapshots_total", db="(all)") == 3,
            WAIT,
            "three snapshots, counted in one series",
            log=log,
        )
        metrics = daemon.metrics()
        assert metrics.value("replicad_databases") == 3
        assert set(metrics.by_label("replicad_snapshots_total", "db")) == {"(all)"}
        assert set(metrics.by_label("replicad_replica_txid", "db")) == {"(all)"}
        assert metrics.value("replicad_replica_requests_total", db="(all)", operation="PUT") >= 3
    finally:
        daemon.stop()


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, tmp_path / "nope", tmp_path / "replica")
    with pytest.raises(ConfigError, match=r"directories\[0\]\.path: .*nope does not exist"):
        load_config(config)
    result = replicad("replicate", "-c", str(config))
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_file_given_as_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    config = _config(tmp_path, tmp_path / "file", tmp_path / "replica")
    with pytest.raises(ConfigError, match="is not a directory"):
        load_config(config)


def test_an_unreadable_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    # These machines run the tests as root, whom permission bits do not stop: what the check
    # asks the system is replaced, so the refusal is tested for any user.
    monkeypatch.setattr("replicad.config.os.access", lambda _path, _mode: False)
    with pytest.raises(ConfigError, match="is not readable by this user"):
        load_config(_config(tmp_path, tenants, tmp_path / "replica"))


def test_a_pattern_matching_nothing_is_a_warning(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    config = _config(tmp_path, tenants, tmp_path / "replica")
    result = replicad("config", "check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "nothing in" in result.stderr
    assert "'*.db'" in result.stderr


def test_bad_directory_settings_name_the_key(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    config = _config(tmp_path, tenants, tmp_path / "replica", "name = 'x'\n")
    with pytest.raises(ConfigError, match=r"directories\[0\]\.name: unknown key"):
        load_config(config)
    config = _config(tmp_path, tenants, tmp_path / "replica", pattern="a/*.db")
    with pytest.raises(ConfigError, match="must match file names"):
        load_config(config)


@pytest.mark.slow
def test_a_directory_of_200_databases(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    replica = tmp_path / "replica"
    names = [f"t{i:03}.db" for i in range(200)]
    for name in names:
        _write(tenants / name, [name])
    config = _config(tmp_path, tenants, replica)
    log = tmp_path / "daemon.log"
    daemon = Daemon.start(["-c", str(config)], log)
    try:
        wait_for(
            lambda: (
                len(daemon.metrics().by_label("replicad_replica_txid", "db")) == 200
                and min(daemon.metrics().by_label("replicad_replica_txid", "db").values()) >= 1
            ),
            300,
            "every database's first upload",
            log=log,
        )
    finally:
        daemon.stop(timeout=120)
    out = tmp_path / "out.db"
    for name in names[::40]:
        assert _restored(["-c", str(config), str(tenants / name)], out) == [name]
