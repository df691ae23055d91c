"""Restore drills: `replicad verify --restore` and `--sample N` on a replica a real daemon wrote,
good and then damaged (a corrupted, a truncated, a missing segment).
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from replicad.position import ObjectKind, parse_key
from tests import workload
from tests.procs import (
    replicad,
    replicated_history,
    start_daemon,
    start_writer,
    stop,
    wait_for,
)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A replica of 300 transactions, shipped by a daemon that was then stopped."""
    return replicated_history(tmp_path_factory.mktemp("drill"), seed=51, count=300, rate=150)


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


# -- drills in the daemon ----------------------------------------------------------------------


def _metric(port: int, name: str) -> float | None:
    text = _http(port, "/metrics")[1]
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{")]
    return values[0] if values else None


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening yet


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_daemon_drills_export_metrics_and_gate_readiness(tmp_path: Path) -> None:
    """verify_interval runs drills; a passing one sets the success time, a damaged segment
    counts a failure naming it, and /readyz fails once no drill passed within the window.
    """
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    conn = sqlite3.connect(db)
    workload.setup(conn)
    conn.close()
    port = _free_port()
    config = tmp_path / "c.toml"
    config.write_text(
        f"metrics_addr = '127.0.0.1:{port}'\nready_max_verify_age = 4\n"
        f"[[databases]]\npath = '{db}'\nverify_interval = 0.5\n"
        f"[[databases.replicas]]\nurl = '{replica.as_uri()}'\n"
    )
    log = tmp_path / "daemon.log"
    daemon = start_daemon(["-c", str(config)], log)
    success = "replicad_verify_last_success_timestamp_seconds"
    failures = "replicad_verify_failures_total"
    try:
        wait_for((replica / "snapshots").exists, 20, "the first snapshot")
        writer = start_writer(db, tmp_path / "writer.log", seed=52, count=100, rate=200)
        assert writer.wait(timeout=60) == 0
        wait_for(lambda: any(replica.rglob("*.seg")), 30, "a segment")
        shipped = time.time()
        wait_for(lambda: (_metric(port, success) or 0) > shipped, 30, "a passing drill")
        assert _http(port, "/readyz")[0] == 200
        assert _metric(port, failures) == 0
        victim = _first_segment(replica)
        _damage(victim, "corrupted")
        wait_for(lambda: (_metric(port, failures) or 0) >= 1, 30, "a failed drill")
        assert "restore drill FAILED" in log.read_text()
        assert str(victim.relative_to(replica)) in log.read_text()
        wait_for(lambda: _http(port, "/readyz")[0] == 503, 30, "/readyz to fail")
        assert (
            "no restore drill" in _http(port, "/readyz")[1]
            or "last drill" in _http(port, "/readyz")[1]
        )
    finally:
        stop(daemon)
