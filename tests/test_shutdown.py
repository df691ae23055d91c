"""Shutdown when the replica cannot take the data: a deadline, a non-zero exit, a clear reason."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import time
from pathlib import Path

from replicad.tip import TIP_KEY
from tests import workload
from tests.procs import start_daemon, stop, wait_for


def _setup(tmp_path: Path, shutdown_timeout: float) -> tuple[Path, Path, Path, Path]:
    db, rep, log = tmp_path / "app.db", tmp_path / "replica", tmp_path / "d.log"
    conn = sqlite3.connect(db)
    workload.setup(conn)
    conn.close()
    config = tmp_path / "c.toml"
    config.write_text(
        f"shutdown_timeout = {shutdown_timeout}\n[[databases]]\npath = '{db}'\n"
        f"[[databases.replicas]]\nurl = '{rep.as_uri()}'\n"
    )
    return db, rep, log, config


def _break_replica(rep: Path) -> None:
    """Make every later write fail: the replica directory becomes a plain file."""
    shutil.rmtree(rep)
    rep.write_text("not a directory")


def _commit(db: Path, n: int) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    for k in range(1, n + 1):
        workload.apply_txn(conn, 3, k)
    conn.close()


def test_unshippable_data_exits_nonzero_after_deadline(tmp_path: Path) -> None:
    db, rep, log, config = _setup(tmp_path, shutdown_timeout=2)
    daemon = start_daemon(["-c", str(config)], log)
    # The tip follows the snapshot in the same upload step: then nothing is being written.
    wait_for((rep / TIP_KEY).exists, 20, "first snapshot and its tip")
    _break_replica(rep)
    _commit(db, 5)
    time.sleep(0.3)
    started = time.monotonic()
    status = stop(daemon)
    elapsed = time.monotonic() - started
    text = log.read_text()
    assert status == 3, text[-2000:]
    assert elapsed < 10
    assert "not uploaded" in text
    assert "Traceback" not in text


def test_second_signal_forces_exit(tmp_path: Path) -> None:
    db, rep, log, config = _setup(tmp_path, shutdown_timeout=60)
    daemon = start_daemon(["-c", str(config)], log)
    # The tip follows the snapshot in the same upload step: then nothing is being written.
    wait_for((rep / TIP_KEY).exists, 20, "first snapshot and its tip")
    _break_replica(rep)
    _commit(db, 3)
    time.sleep(0.3)
    daemon.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping" in log.read_text(), 10, "graceful stop to begin")
    started = time.monotonic()
    assert stop(daemon, signal.SIGTERM, timeout=10) == 130
    assert time.monotonic() - started < 5
