"""Shutdown when the replica cannot take the data: a deadline, a non-zero exit, a clear reason."""

from __future__ import annotations

import functools
import shutil
import signal
import sqlite3
import time
from pathlib import Path

from replicad.tip import TIP_KEY
from tests import workload
from tests.procs import Daemon, replicad, start_daemon, stop, wait_for


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


def _captured(daemon: Daemon, count: int) -> None:
    """Wait until the daemon has read `count` transactions (they are then its to ship)."""
    wait_for(
        lambda: daemon.metric("replicad_transactions_total") >= count,
        20,
        f"{count} transactions captured",
        log=daemon.log,
    )


def test_unshippable_data_exits_nonzero_after_deadline(tmp_path: Path) -> None:
    db, rep, log, config = _setup(tmp_path, shutdown_timeout=2)
    daemon = Daemon.start(["-c", str(config)], log)
    # The tip follows the snapshot in the same upload step: then nothing is being written.
    wait_for((rep / TIP_KEY).exists, 20, "first snapshot and its tip")
    _break_replica(rep)
    _commit(db, 5)
    _captured(daemon, 5)
    started = time.monotonic()
    status = stop(daemon.proc)
    elapsed = time.monotonic() - started
    text = log.read_text()
    assert status == 3, text[-2000:]
    assert elapsed < 10
    assert "not uploaded" in text
    assert "Traceback" not in text


def test_second_signal_forces_exit(tmp_path: Path) -> None:
    db, rep, log, config = _setup(tmp_path, shutdown_timeout=60)
    daemon = Daemon.start(["-c", str(config)], log)
    # The tip follows the snapshot in the same upload step: then nothing is being written.
    wait_for((rep / TIP_KEY).exists, 20, "first snapshot and its tip")
    _break_replica(rep)
    _commit(db, 3)
    _captured(daemon, 3)
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping" in log.read_text(), 10, "graceful stop to begin")
    started = time.monotonic()
    assert stop(daemon.proc, signal.SIGTERM, timeout=10) == 130
    assert time.monotonic() - started < 5


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler installed now (`SigCgt` in /proc): before
    `replicad.launch` installs one, SIGTERM takes its default action (docs/design.md).
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def test_sigterm_in_the_first_200_ms_is_a_clean_stop(tmp_path: Path) -> None:
    """A stop at any moment of start-up ships what was committed and exits 0, or exits non-zero
    saying what was not shipped; death by the signal only while no handler was installed yet
    (the interpreter's own start-up), which the test reads from /proc rather than guessing from
    the clock.
    """
    db, rep, log, config = _setup(tmp_path, shutdown_timeout=20)
    outcomes = []
    # Every 10 ms of the first 200, then once the handler is certainly in place.
    delays: list[int | None] = [*range(0, 201, 10), None]
    for n, delay_ms in enumerate(delays):
        _commit(db, n + 1)  # committed while no daemon ran
        started = time.monotonic()
        daemon = start_daemon(["-c", str(config)], log)
        if delay_ms is None:
            wait_for(functools.partial(_catches_sigterm, daemon.pid), 60, "the SIGTERM handler")
        else:
            time.sleep(max(0.0, started + delay_ms / 1000 - time.monotonic()))
        handled = _catches_sigterm(daemon.pid)
        status = stop(daemon)
        outcomes.append((delay_ms, status))
        if status < 0:
            assert not handled, f"killed by signal {-status} at {delay_ms} ms with a handler in"
            continue
        if status != 0:
            assert "not uploaded" in log.read_text() or "error" in log.read_text()
            continue
        out = tmp_path / f"out-{n}.db"
        restored = replicad("restore", "-o", str(out), rep.as_uri())
        assert restored.returncode == 0, restored.stderr
        assert workload.dump(out) == workload.dump(db), f"exit 0 at {delay_ms} ms: all shipped"
    print(f"(delay ms, exit status): {outcomes}")
    assert outcomes[-1][1] == 0, "with the handler in place, a stop is a clean stop"
    assert "Traceback" not in log.read_text()
