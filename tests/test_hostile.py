"""Hostile and broken inputs: each gets a clear error, and nothing wrong is ever written."""

from __future__ import annotations

import functools
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests import workload
from tests.procs import mounted_tmpfs, replicad, start_daemon, stop, wait_for


@pytest.fixture
def replica(tmp_path: Path) -> Path:
    """A file replica with a snapshot and several segments, made by a real daemon."""
    db, rep = tmp_path / "app.db", tmp_path / "rep"
    conn = sqlite3.connect(db, isolation_level=None)
    workload.setup(conn)
    config = tmp_path / "c.toml"
    config.write_text(
        f"[[databases]]\npath = '{db}'\nsync_interval = 0\n"
        f"[[databases.replicas]]\nurl = '{rep.as_uri()}'\n"
    )
    daemon = start_daemon(["-c", str(config)], tmp_path / "d.log")
    wait_for(lambda: any((rep / "snapshots").glob("*.snap")), 20, "snapshot")
    segments = rep / "segments" / "00"
    for k in range(1, 120):
        workload.apply_txn(conn, 4, k)
        if k % 20 == 0:  # several uploads, so there are several segments
            wait_for(functools.partial(_has_segments, segments, k // 20), 20, "upload")
    conn.close()
    assert stop(daemon) == 0
    return rep


def _segments(rep: Path) -> list[Path]:
    return sorted((rep / "segments" / "00").glob("*.seg"))


def _restore(rep: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return replicad("restore", *extra, "-o", str(out), rep.as_uri())


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["header", "middle", "end"])
def test_corrupt_segment_fails_loudly_and_writes_nothing(
    replica: Path, tmp_path: Path, where: str
) -> None:
    victim = _segments(replica)[len(_segments(replica)) // 2]
    size = victim.stat().st_size
    _flip(victim, {"header": 20, "middle": size // 2, "end": size - 5}[where])
    out = tmp_path / "out.db"
    result = _restore(replica, out)
    assert result.returncode == 1
    assert victim.name in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not out.with_name("out.db.tmp").exists()


def test_truncated_snapshot_fails_loudly(replica: Path, tmp_path: Path) -> None:
    snap = next((replica / "snapshots").glob("*.snap"))
    snap.write_bytes(snap.read_bytes()[: snap.stat().st_size // 2])
    result = _restore(replica, tmp_path / "out.db")
    assert result.returncode == 1
    assert snap.name in result.stderr
    assert not (tmp_path / "out.db").exists()


def test_restore_before_a_damaged_object_still_works(replica: Path, tmp_path: Path) -> None:
    victim = _segments(replica)[-1]
    _flip(victim, victim.stat().st_size // 2)
    first_bad = int(victim.name.split("-")[0], 16)
    out = tmp_path / "out.db"
    assert _restore(replica, out, "--txid", str(first_bad - 1)).returncode == 0
    assert workload.integrity(out) == "ok"


def test_foreign_objects_are_ignored_with_a_warning(replica: Path, tmp_path: Path) -> None:
    (replica / "notes.txt").write_text("hello")
    (replica / "snapshots" / "backup.snap").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    (replica / "segments" / "00" / "zz.seg").write_bytes(os.urandom(50))
    out = tmp_path / "out.db"
    assert _restore(replica, out).returncode == 0
    assert workload.seq_of(out) == 119
    db = tmp_path / "app.db"
    daemon = start_daemon([str(db), replica.as_uri()], tmp_path / "d2.log")
    try:
        wait_for(lambda: "not replicad's" in (tmp_path / "d2.log").read_text(), 20, "warning")
    finally:
        assert stop(daemon) == 0


def test_object_of_another_kind_under_a_valid_name(replica: Path, tmp_path: Path) -> None:
    """A segment renamed as a snapshot is refused: content must match its key."""
    seg = _segments(replica)[-1]
    fake = replica / "snapshots" / f"{'f' * 15}0-1000000000000.snap"
    fake.write_bytes(seg.read_bytes())
    result = replicad(
        "restore",
        "--txid",
        str(int("f" * 15 + "0", 16)),
        "-o",
        str(tmp_path / "o.db"),
        replica.as_uri(),
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr


def test_full_disk_for_the_restore_target(replica: Path, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "small", "size=64k") as small:
        out = small / "out.db"
        result = _restore(replica, out)
        assert result.returncode == 1
        assert "No space left on device" in result.stderr
        assert "free space" in result.stderr
        assert not out.exists()
        assert not list(small.iterdir()), "the partial file was removed"


def test_missing_target_directory(replica: Path, tmp_path: Path) -> None:
    result = _restore(replica, tmp_path / "nope" / "out.db")
    assert result.returncode == 1
    assert "does not exist" in result.stderr


def test_garbage_after_the_last_commit_is_not_shipped(tmp_path: Path) -> None:
    """Bytes after the last valid frame (a torn write, junk) end the log; nothing of them ships."""
    db, rep = tmp_path / "app.db", tmp_path / "rep"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t(x)")
    for i in range(20):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
    with (tmp_path / "app.db-wal").open("ab") as wal:
        wal.write(os.urandom(10000))
    config = tmp_path / "c.toml"
    config.write_text(
        f"[[databases]]\npath = '{db}'\ncheckpoint_pages = 0\n"
        f"[[databases.replicas]]\nurl = '{rep.as_uri()}'\n"
    )
    daemon = start_daemon(["-c", str(config)], tmp_path / "d.log")
    try:
        wait_for(lambda: any((rep / "snapshots").glob("*.snap")), 20, "snapshot")
    finally:
        assert stop(daemon) == 0
    conn.close()
    out = tmp_path / "out.db"
    assert _restore(rep, out).returncode == 0
    assert workload.integrity(out) == "ok"
    assert sqlite3.connect(out).execute("SELECT count(*) FROM t").fetchone()[0] == 20


def _has_segments(directory: Path, n: int) -> bool:
    return len(list(directory.glob("*.seg"))) >= n
