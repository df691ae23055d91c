"""Inputs that cannot hurt: non-finite settings, forged pid files, missing directories and
read-only replicas each end in a clear message, never in a wedged or misdirected daemon.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicad.config import load_config
from replicad.errors import ConfigError
from tests import workload
from tests.procs import mounted_tmpfs, replicad, start_daemon, stop, wait_for

# -- float settings ---------------------------------------------------------------------------

_FLOAT_KEYS = [
    ("", "shutdown_timeout"),
    ("", "ready_max_lag"),
    ("db", "poll_interval"),
    ("db", "sync_interval"),
    ("db", "snapshot_interval"),
    ("db", "checkpoint_interval"),
    ("db", "checkpoint_timeout"),
    ("replica", "retention"),
    ("replica", "lease_duration"),
]


def _config_with(table: str, line: str) -> str:
    top = line + "\n" if table == "" else ""
    db = line + "\n" if table == "db" else ""
    replica = line + "\n" if table == "replica" else ""
    return (
        f"{top}[[databases]]\npath = '/tmp/a.db'\n{db}"
        f"[[databases.replicas]]\nurl = 'file:///tmp/r'\n{replica}"
    )


def _key_path(table: str, key: str) -> str:
    return {
        "": key,
        "db": f"databases[0].{key}",
        "replica": f"databases[0].replicas[0].{key}",
    }[table]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan", "1e300"])
@pytest.mark.parametrize(("table", "key"), _FLOAT_KEYS)
def test_float_settings_must_be_finite_and_in_range(
    tmp_path: Path, table: str, key: str, value: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(_config_with(table, f"{key} = {value}"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {_key_path(table, key)}: "), message


def test_checkpoint_timeout_fits_sqlite_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(_config_with("db", "checkpoint_timeout = 3000000"))
    with pytest.raises(ConfigError, match="checkpoint_timeout: must be at most 86400"):
        load_config(path)


@pytest.mark.parametrize("levels", ["[inf]", "[nan]", "[30, inf]", "[1e300]"])
def test_compaction_levels_must_be_finite(tmp_path: Path, levels: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(_config_with("replica", f"compaction_levels = {levels}"))
    with pytest.raises(ConfigError, match=r"replicas\[0\]\.compaction_levels"):
        load_config(path)


def test_finite_settings_still_load(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(_config_with("replica", "retention = 86400.5\nlease_duration = 1e3"))
    replica = load_config(path).databases[0].replicas[0]
    assert (replica.retention, replica.lease_duration) == (86400.5, 1000.0)


# -- replicad snapshot signals only its own daemon ----------------------------------------------

_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, (sys.argv[2] if len(sys.argv) > 2 else str(os.getpid())).encode() + b"\\n")
print("locked", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def _process(cmd: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _lock_holder(db: Path, named_pid: int | None = None) -> Iterator[subprocess.Popen[str]]:
    """A non-replicad process that holds the database's state lock and writes `named_pid` (its
    own pid if None) into the pid file.
    """
    state = db.with_name(f".{db.name}-replicad")
    state.mkdir(mode=0o700, exist_ok=True)
    cmd = [sys.executable, "-c", _HOLDER, str(state / "replicad.pid")]
    if named_pid is not None:
        cmd.append(str(named_pid))
    with _process(cmd) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        yield holder


def test_snapshot_refuses_a_pid_that_is_not_replicad(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    with _process(["sleep", "120"]) as victim, _lock_holder(db, victim.pid):
        result = replicad("snapshot", str(db))
        assert result.returncode == 1
        assert f"refusing to signal pid {victim.pid}" in result.stderr
        assert "not a replicad process" in result.stderr
        assert victim.poll() is None, "SIGUSR1 would have killed it"


def test_snapshot_refuses_a_replicad_that_does_not_hold_the_lock(tmp_path: Path) -> None:
    """The pid file names a real replicad process, but of another database: it holds another
    lock, not this one.
    """
    other_db, other_rep = tmp_path / "other.db", tmp_path / "other-rep"
    sqlite3.connect(other_db).execute("PRAGMA journal_mode=WAL").close()
    other = start_daemon([str(other_db), other_rep.as_uri()], tmp_path / "other.log")
    try:
        wait_for(lambda: any(other_rep.glob("snapshots/*.snap")), 20, "other daemon's snapshot")
        with _lock_holder(tmp_path / "app.db", other.pid):
            result = replicad("snapshot", str(tmp_path / "app.db"))
        assert result.returncode == 1
        assert "does not hold the state directory's lock" in result.stderr
    finally:
        assert stop(other) == 0


def test_snapshot_refuses_another_users_process(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("starting a process as another user needs root")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "120"]
    with _process(nobody) as victim, _lock_holder(tmp_path / "app.db", victim.pid):
        wait_for(lambda: Path(f"/proc/{victim.pid}").stat().st_uid == 65534, 10, "setpriv")
        result = replicad("snapshot", str(tmp_path / "app.db"))
        assert result.returncode == 1
        assert "belongs to uid 65534" in result.stderr
        assert victim.poll() is None


def test_snapshot_signals_the_real_daemon(tmp_path: Path) -> None:
    db, rep = tmp_path / "app.db", tmp_path / "rep"
    conn = sqlite3.connect(db, isolation_level=None)
    workload.setup(conn)
    daemon = start_daemon([str(db), rep.as_uri()], tmp_path / "d.log")
    try:
        wait_for(lambda: len(list(rep.glob("snapshots/*.snap"))) == 1, 20, "first snapshot")
        workload.apply_txn(conn, 5, 1)
        result = replicad("snapshot", str(db))
        assert result.returncode == 0, result.stderr
        assert f'"pid": {daemon.pid}' in result.stdout
        wait_for(lambda: len(list(rep.glob("snapshots/*.snap"))) == 2, 20, "requested snapshot")
    finally:
        conn.close()
        assert stop(daemon) == 0


# -- a missing database directory is never created ------------------------------------------------


def test_missing_database_directory_is_not_created(tmp_path: Path) -> None:
    db = tmp_path / "nonexistent" / "dir" / "app.db"
    daemon = start_daemon([str(db), (tmp_path / "rep").as_uri()], tmp_path / "d.log")
    status = daemon.wait(timeout=60)
    log = (tmp_path / "d.log").read_text()
    assert status == 1, log
    assert f"the directory of {db} does not exist" in log
    assert "Traceback" not in log
    assert not (tmp_path / "nonexistent").exists()


# -- a read-only replica is a failed write ---------------------------------------------------------


def test_read_only_replica_is_reported_as_a_failed_write(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db, isolation_level=None)
    workload.setup(conn)
    conn.close()
    log = tmp_path / "d.log"
    with mounted_tmpfs(tmp_path / "rep", "size=1m,ro") as rep:
        daemon = start_daemon([str(db), rep.as_uri()], log)
        try:
            wait_for(lambda: "cannot write replica" in log.read_text(), 30, "the failed write")
        finally:
            status = stop(daemon, signal.SIGTERM)
    text = log.read_text()
    assert "cannot read replica" not in text
    assert "Read-only file system" in text
    assert status == 3, text
    assert "waited for the replica until shutdown (cannot write it: PUT" in text
    assert "0 transactions" not in text
