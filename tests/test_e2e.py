"""End to end: real writer processes, a real daemon process, SIGTERM/SIGKILL, restore, compare."""

from __future__ import annotations

import random
import signal
import urllib.request
from pathlib import Path

import pytest

from tests import workload
from tests.procs import Daemon, replicad, start_daemon, start_writer, stop, wait_for


def _make_db(path: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(path)
    workload.setup(conn)
    conn.close()


def _snapshots(replica: Path) -> list[Path]:
    return sorted((replica / "snapshots").glob("*.snap"))


def _restore(replica: Path, out: Path) -> None:
    result = replicad("restore", "-o", str(out), replica.as_uri())
    assert result.returncode == 0, result.stderr


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    return {
        "db": tmp_path / "app.db",
        "replica": tmp_path / "replica",
        "out": tmp_path / "restored.db",
        "wlog": tmp_path / "writer.log",
        "dlog": tmp_path / "daemon.log",
        "replay": tmp_path / "replay.db",
    }


def test_sigterm_ships_everything_committed(paths: dict[str, Path]) -> None:
    """App autocheckpoint on (the default); SIGTERM right after the last commit loses nothing."""
    _make_db(paths["db"])
    daemon = start_daemon([str(paths["db"]), paths["replica"].as_uri()], paths["dlog"])
    try:
        wait_for(lambda: bool(_snapshots(paths["replica"])), 20, "the first snapshot")
        writer = start_writer(paths["db"], paths["wlog"], seed=11, count=700, rate=400)
        assert writer.wait(timeout=60) == 0
    finally:
        status = stop(daemon)
    assert status == 0, paths["dlog"].read_text()[-3000:]
    _restore(paths["replica"], paths["out"])
    assert workload.integrity(paths["out"]) == "ok"
    assert workload.seq_of(paths["out"]) == 700
    assert workload.dump(paths["out"]) == workload.dump(paths["db"])


def test_sigkill_restart_resumes_without_snapshot(paths: dict[str, Path]) -> None:
    """Nobody checkpoints: a killed daemon restarts from the replica's position, no snapshot."""
    _make_db(paths["db"])
    config = paths["db"].with_name("c.toml")
    config.write_text(  # the app's autocheckpoint is off too, so the WAL stays as it was
        f"[[databases]]\npath = '{paths['db']}'\ncheckpoint_pages = 0\n"
        f"[[databases.replicas]]\nurl = '{paths['replica'].as_uri()}'\n"
    )
    args = ["-c", str(config)]
    daemon = start_daemon(args, paths["dlog"])
    wait_for(lambda: bool(_snapshots(paths["replica"])), 20, "the first snapshot")
    writer = start_writer(
        paths["db"], paths["wlog"], seed=12, count=1200, rate=300, autocheckpoint=0
    )
    try:
        wait_for(lambda: len(workload.read_log(paths["wlog"])) > 300, 30, "writer progress")
        stop(daemon, signal.SIGKILL)
        wait_for(lambda: len(workload.read_log(paths["wlog"])) > 500, 30, "writer progress")
        daemon = start_daemon(args, paths["dlog"])
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
        status = stop(daemon)
    assert status == 0, paths["dlog"].read_text()[-3000:]
    assert len(_snapshots(paths["replica"])) == 1, "restart should resume, not snapshot"
    _restore(paths["replica"], paths["out"])
    assert workload.integrity(paths["out"]) == "ok"
    assert workload.dump(paths["out"]) == workload.dump(paths["db"])


def test_sigkill_leaves_a_committed_prefix(paths: dict[str, Path]) -> None:
    """Restore after SIGKILL (no restart) is exactly the state after some commit k."""
    _make_db(paths["db"])
    daemon = start_daemon([str(paths["db"]), paths["replica"].as_uri()], paths["dlog"])
    wait_for(lambda: bool(_snapshots(paths["replica"])), 20, "the first snapshot")
    writer = start_writer(paths["db"], paths["wlog"], seed=13, count=3000, rate=300)
    try:
        segments = paths["replica"] / "segments" / "00"
        wait_for(  # a finished one: the file backend writes `.tmp-*` first, then links it
            lambda: segments.exists() and any(p.suffix == ".seg" for p in segments.iterdir()),
            30,
            "a shipped segment",
        )
        wait_for(
            lambda: len(workload.read_log(paths["wlog"])) > random.randint(200, 600), 30, "writes"
        )
        stop(daemon, signal.SIGKILL)
        committed = workload.read_log(paths["wlog"])[-1][0]
    finally:
        writer.kill()
        writer.wait()
    _restore(paths["replica"], paths["out"])
    assert workload.integrity(paths["out"]) == "ok"
    k = workload.seq_of(paths["out"])
    assert 0 < k <= committed
    assert workload.dump(paths["out"]) == workload.replay(13, k, paths["replay"])


def test_metrics_endpoint_counts_requests_and_transactions(paths: dict[str, Path]) -> None:
    _make_db(paths["db"])
    daemon = Daemon.start([str(paths["db"]), paths["replica"].as_uri()], paths["dlog"])
    try:
        wait_for(lambda: bool(_snapshots(paths["replica"])), 20, "the first snapshot")
        writer = start_writer(paths["db"], paths["wlog"], seed=14, count=50, rate=200)
        assert writer.wait(timeout=60) == 0

        def shipped() -> bool:
            try:
                metrics = daemon.metrics()
            except OSError:  # the endpoint is not serving yet
                return False
            return (
                metrics.value("replicad_transactions_total") >= 50
                and metrics.value("replicad_replication_lag_seconds") == 0
            )

        wait_for(shipped, 30, "every commit captured and shipped", log=paths["dlog"])
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(f"http://{daemon.address}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        daemon.stop()
    assert 'replicad_transactions_total{db="app"}' in text
    assert 'replicad_replica_requests_total{db="app",operation="PUT",replica="file0"}' in text
    assert 'replicad_replication_lag_seconds{db="app",replica="file0"} 0.0' in text
    transactions = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('replicad_transactions_total{db="app"}')
    )
    assert transactions >= 50
