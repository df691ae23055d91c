"""Restore drills: `replicad verify --restore` and `--sample N` on a replica a real daemon wrote,
good and then damaged (a corrupted, a truncated, a missing segment)."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
from pathlib import Path

import pytest

from replicad.position import ObjectKind, parse_key
from tests import workload
from tests.procs import replicad, start_daemon, start_writer, stop, wait_for


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A replica of 300 transactions, shipped by a daemon that was then stopped."""
    tmp = tmp_path_factory.mktemp("drill")
    db, replica = tmp / "app.db", tmp / "replica"
    conn = sqlite3.connect(db)
    workload.setup(conn)
    conn.close()
    daemon = start_daemon([str(db), replica.as_uri()], tmp / "daemon.log")
    try:
        wait_for((replica / "snapshots").exists, 20, "the first snapshot")
        writer = start_writer(db, tmp / "writer.log", seed=51, count=300, rate=150)
        assert writer.wait(timeout=60) == 0
    finally:
        assert stop(daemon, signal.SIGTERM) == 0
    return replica


@pytest.fixture
def replica(written: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "replica"
    shutil.copytree(written, copy)
    return copy


def _first_segment(replica: Path) -> Path:
    segments = sorted(
        (n for p in replica.rglob("*.seg") if (n := parse_key(str(p.relative_to(replica))))),
        key=lambda n: n.first_txid,
    )
    first = next(n for n in segments if n.kind is ObjectKind.SEGMENT and n.level == 0)
    return replica / first.key


def _damage(victim: Path, how: str) -> None:
    data = victim.read_bytes()
    if how == "missing":
        victim.unlink()
    elif how == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    else:
        middle = len(data) // 2
        victim.write_bytes(data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1 :])


def test_drills_pass_on_a_good_replica(replica: Path) -> None:
    restored = replicad("verify", replica.as_uri(), "--restore", "--json")
    assert restored.returncode == 0, restored.stderr
    report = json.loads(restored.stdout)
    assert report["ok"]
    assert report["restored"]
    assert report["checks"] > 300
    sampled = replicad("verify", replica.as_uri(), "--sample", "5", "--json")
    assert sampled.returncode == 0, sampled.stderr
    samples = json.loads(sampled.stdout)["samples"]
    assert len(samples) == 5
    assert all(s["ok"] for s in samples)


@pytest.mark.parametrize("how", ["corrupted", "truncated", "missing"])
def test_drills_fail_naming_the_damage(replica: Path, how: str) -> None:
    victim = _first_segment(replica)
    name = parse_key(str(victim.relative_to(replica)))
    assert name is not None
    _damage(victim, how)
    expected = f"no segment starts at TXID {name.first_txid}" if how == "missing" else name.key
    restored = replicad("verify", replica.as_uri(), "--restore")
    assert restored.returncode == 1, restored.stdout
    assert expected in restored.stderr, restored.stderr
    assert "Traceback" not in restored.stderr
    # Every sampled TXID after the snapshot needs the damaged segment (at most one is not after).
    sampled = replicad("verify", replica.as_uri(), "--sample", "4")
    assert sampled.returncode == 1, sampled.stdout
    failed = [line for line in sampled.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) >= 3, sampled.stdout
    assert all(expected in line for line in failed), sampled.stdout
