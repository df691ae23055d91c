"""Files only their owner can read: under umask 022, everything replicad creates is 0600/0700,
and `restore --force` leaves the replaced database's owner and mode as they were.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicad.private import adopt_owner_and_mode, create_private, make_state_dir
from replicad.replica import spool_path
from tests import workload
from tests.procs import replicad, start_daemon, stop, wait_for


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    """The usual umask, under which plain `open()` makes 0644 files and 0755 directories."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _all_private(root: Path) -> None:
    assert _mode(root) == 0o700, root
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            assert _mode(Path(directory, name)) == 0o700, Path(directory, name)
        for name in files:
            assert _mode(Path(directory, name)) == 0o600, Path(directory, name)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 0600 database replicated by a daemon started under umask 022, with a transaction big
    enough to go through the on-disk spool.
    """
    old = os.umask(0o022)
    try:
        tmp = tmp_path_factory.mktemp("modes")
        db, rep = tmp / "app.db", tmp / "replica"
        conn = sqlite3.connect(db, isolation_level=None)
        workload.setup(conn)
        os.chmod(db, 0o600)
        daemon = start_daemon([str(db), rep.as_uri()], tmp / "daemon.log")
        try:
            wait_for(lambda: any(rep.glob("snapshots/*.snap")), 20, "first snapshot")
            conn.execute("CREATE TABLE big(x)")
            conn.execute("INSERT INTO big VALUES (randomblob(40 << 20))")
            for k in range(1, 20):
                workload.apply_txn(conn, 5, k)
            _all_private(db.with_name(f".{db.name}-replicad"))  # while the daemon runs
        finally:
            conn.close()
            assert stop(daemon) == 0, (tmp / "daemon.log").read_text()[-2000:]
    finally:
        os.umask(old)
    return db, rep


def test_replica_objects_and_directories_are_private(replicated: tuple[Path, Path]) -> None:
    _, rep = replicated
    assert list(rep.glob("segments/*/*.seg")), "segments were written"
    _all_private(rep)


def test_state_directory_and_its_files_are_private(replicated: tuple[Path, Path]) -> None:
    db, _ = replicated
    state = db.with_name(f".{db.name}-replicad")
    assert (state / "replicad.pid").exists()
    _all_private(state)


def test_restored_database_is_private(replicated: tuple[Path, Path], tmp_path: Path) -> None:
    _, rep = replicated
    out = tmp_path / "out.db"
    result = replicad("restore", "-o", str(out), rep.as_uri())
    assert result.returncode == 0, result.stderr
    assert _mode(out) == 0o600


def test_restore_force_keeps_owner_and_mode(replicated: tuple[Path, Path], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    _, rep = replicated
    out = tmp_path / "app.db"
    out.write_bytes(b"old")
    os.chown(out, 65534, 65534)
    os.chmod(out, 0o640)
    result = replicad("restore", "--force", "-o", str(out), rep.as_uri())
    assert result.returncode == 0, result.stderr
    info = out.stat()
    assert (info.st_uid, info.st_gid, _mode(out)) == (65534, 65534, 0o640)
    assert workload.integrity(out) == "ok"


def test_adopting_the_mode_of_a_file_of_the_same_owner(tmp_path: Path) -> None:
    new, old = tmp_path / "new", tmp_path / "old"
    new.write_bytes(b"n")
    old.write_bytes(b"o")
    os.chmod(old, 0o640)
    adopt_owner_and_mode(new, old)  # same owner: only the mode changes
    assert _mode(new) == 0o640


def test_created_files_refuse_planted_names(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    planted = tmp_path / "spool.tmp"
    planted.symlink_to(target)
    with pytest.raises(FileExistsError):
        create_private(planted)
    assert target.read_bytes() == b"precious"
    fresh = tmp_path / "fresh.tmp"
    with create_private(fresh) as f:
        f.write(b"x")
    assert _mode(fresh) == 0o600


def test_spool_names_are_unpredictable_and_the_directory_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first, second = spool_path(state, 5), spool_path(state, 5)
    assert first != second
    assert first.parent == state
    assert _mode(state) == 0o700


def test_an_existing_state_directory_is_tightened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    make_state_dir(state)
    assert _mode(state) == 0o700
