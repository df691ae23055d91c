"""One writer per replica prefix and one daemon per database, with real daemon processes.

The lease itself is tested without processes (and without real time) in test_lease.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests import workload
from tests.procs import (
    ROOT,
    clean_env,
    free_port,
    replicad,
    start_daemon,
    start_writer,
    stop,
    wait_for,
)
from tests.s3servers import S3Server, create_bucket, unique_bucket


def _env(server: S3Server, tmp: Path) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": server.access_key_id,
        "AWS_SECRET_ACCESS_KEY": server.secret_access_key,
        "AWS_CONFIG_FILE": str(tmp / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def _db(path: Path) -> Path:
    conn = sqlite3.connect(path)
    workload.setup(conn)
    conn.close()
    return path


def _write(db: Path, first: int, count: int) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    for k in range(first, first + count):
        workload.apply_txn(conn, 9, k)
    conn.close()


async def test_second_daemon_is_refused_and_takeover_fences_the_first(
    moto_server: S3Server, tmp_path: Path
) -> None:
    bucket = unique_bucket()
    await create_bucket(moto_server, bucket)
    env = _env(moto_server, tmp_path)
    url = f"s3://{bucket}/app?endpoint={moto_server.endpoint_url}&path_style=true&region=us-east-1"
    a, b = _db(tmp_path / "a.db"), _db(tmp_path / "b.db")
    config = tmp_path / "a.toml"
    config.write_text(  # a short lease, so the stale daemon's renewal comes within the test
        f"[[databases]]\npath = '{a}'\n[[databases.replicas]]\nurl = '{url}'\nlease_duration = 6\n"
    )
    first = start_daemon(["-c", str(config)], tmp_path / "a.log", env=env)
    try:
        wait_for(lambda: "snapshot uploaded" in (tmp_path / "a.log").read_text(), 30, "first up")
        refused = await asyncio.to_thread(
            replicad, "replicate", str(b), url, "--no-standby", env=env, timeout=60
        )
        assert refused.returncode == 1
        assert "is being written by" in refused.stderr
        assert str(a) in refused.stderr
        assert "--takeover" in refused.stderr
        second = start_daemon([str(b), url, "--takeover"], tmp_path / "b.log", env=env)
        try:
            wait_for(lambda: "taking over" in (tmp_path / "b.log").read_text(), 30, "takeover")
            wait_for(lambda: "snapshot uploaded" in (tmp_path / "b.log").read_text(), 30, "b up")
            _write(b, 1, 7)
            for k in range(1, 60):  # the stale daemon keeps shipping until its renewal fails
                _write(a, k, 1)
                await asyncio.sleep(0.2)
                if "lease lost" in (tmp_path / "a.log").read_text():
                    break
            else:
                raise AssertionError("the stale daemon never noticed the takeover")
            await asyncio.sleep(1.5)
        finally:
            assert stop(second) == 0
    finally:
        status_a = stop(first)
    assert status_a == 4, "the fenced daemon could not ship what it captured: it must say so"
    out = tmp_path / "out.db"
    result = await asyncio.to_thread(replicad, "restore", "-o", str(out), url, env=env)
    assert result.returncode == 0, result.stderr
    assert workload.dump(out) == workload.dump(b), "the new owner's history is intact"
    ls = await asyncio.to_thread(replicad, "ls", "--json", url, env=env)
    newest = json.loads(ls.stdout)["newest_txid"]
    assert newest > 1 << 32, "the new owner numbers its history above anything stale"


async def test_rclone_warns_that_fencing_is_off(rclone_server: S3Server, tmp_path: Path) -> None:
    bucket = unique_bucket()
    await create_bucket(rclone_server, bucket)
    env = _env(rclone_server, tmp_path)
    config = tmp_path / "c.toml"
    db = _db(tmp_path / "a.db")
    config.write_text(
        f"[[databases]]\npath = '{db}'\n[[databases.replicas]]\n"
        f"url = 's3://{bucket}/app?endpoint={rclone_server.endpoint_url}&path_style=true'\n"
        "conditional_writes = false\n"
    )
    daemon = start_daemon(["-c", str(config)], tmp_path / "d.log", env=env)
    try:
        wait_for(lambda: "fencing is off" in (tmp_path / "d.log").read_text(), 30, "warning")
    finally:
        assert stop(daemon) == 0


# -- one daemon per database on a host ----------------------------------------------------------


def _events(log: Path) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def _event_time(log: Path, text: str) -> float:
    for event in _events(log):
        if text in str(event.get("event", "")):
            return datetime.fromisoformat(event["timestamp"]).timestamp()
    raise AssertionError(f"{text!r} not in {log}")


def _config(tmp: Path, name: str, db: Path, url: str, extra: str = "") -> Path:
    config = tmp / f"{name}.toml"
    config.write_text(
        f"[[databases]]\npath = '{db}'\nstate_dir = '{tmp / ('state-' + name)}'\n"
        f"[[databases.replicas]]\nurl = '{url}'\n{extra}"
    )
    return config


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_rolling_deploy_on_one_host_hands_over_within_a_second(tmp_path: Path) -> None:
    """Two daemons for one database with their own state_dirs: the second waits as a standby
    (alive, not ready), the first stops, the second takes over and the replica holds every
    commit; never both writing.
    """
    db = _db(tmp_path / "app.db")
    url = (tmp_path / "rep").as_uri()
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    first = start_daemon(["-c", str(_config(tmp_path, "a", db, url))], a_log)
    second = None
    writer = None
    try:
        wait_for(lambda: "snapshot uploaded" in a_log.read_text(), 30, "first up")
        writer = start_writer(db, tmp_path / "w.log", seed=5, count=600, rate=150)
        port = free_port()
        second = start_daemon(
            ["-c", str(_config(tmp_path, "b", db, url)), "--metrics-addr", f"127.0.0.1:{port}"],
            b_log,
        )
        wait_for(lambda: "waiting as a standby" in b_log.read_text(), 30, "second to wait")
        assert f"pid {first.pid}" in b_log.read_text(), "it says whom it waits for"
        wait_for(lambda: _get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 30, "healthz")
        status, body = _get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503
        assert "standby: waiting for another replicad" in body
        refused = replicad("replicate", "-c", str(_config(tmp_path, "c", db, url)), "--no-standby")
        assert refused.returncode == 1
        assert f"another replicad (pid {first.pid}) is already replicating" in refused.stderr
        assert "Traceback" not in refused.stderr
        wait_for(lambda: len(workload.read_log(tmp_path / "w.log")) > 150, 30, "writes going on")
        assert stop(first) == 0
        wait_for(lambda: "taking over this database" in b_log.read_text(), 30, "handover")
        handover = _event_time(b_log, "taking over this database") - _event_time(
            a_log, "everything committed was shipped"
        )
        wait_for(lambda: "resumed from replica" in b_log.read_text(), 30, "second resumes")
        resumed = _event_time(b_log, "resumed from replica") - _event_time(
            a_log, "everything committed was shipped"
        )
        print(f"handover: lock taken {handover:.3f} s, resumed {resumed:.3f} s after the stop")
        assert 0 < handover < 5, "after the first one stopped; the lock is polled every 100 ms"
        assert writer.wait(timeout=60) == 0
        wait_for(lambda: _get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 30, "ready")
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        status_a = stop(first)
        status_b = stop(second) if second is not None else 0
    assert (status_a, status_b) == (0, 0)
    out = tmp_path / "out.db"
    result = replicad("restore", "-o", str(out), url)
    assert result.returncode == 0, result.stderr
    assert workload.dump(out) == workload.dump(db), "the newest restore holds every commit"
    assert workload.seq_of(out) == 600


def _first_daemon(tmp_path: Path) -> tuple[Path, str, subprocess.Popen[bytes]]:
    """A database, a replica URL, and a daemon replicating one to the other, started."""
    db = _db(tmp_path / "app.db")
    url = (tmp_path / "rep").as_uri()
    first = start_daemon([str(db), url], tmp_path / "a.log")
    wait_for(lambda: "snapshot uploaded" in (tmp_path / "a.log").read_text(), 30, "first up")
    return db, url, first


def test_two_daemons_on_one_database_exit_with_no_standby(tmp_path: Path) -> None:
    db, url, first = _first_daemon(tmp_path)
    try:
        config = _config(tmp_path, "b", db, url, "")
        config.write_text("standby = false\n" + config.read_text())
        refused = replicad("replicate", "-c", str(config))
        assert refused.returncode == 1, refused.stderr
        assert f"another replicad (pid {first.pid}) is already replicating {db}" in refused.stderr
        assert "--no-standby" in refused.stderr, "the hint says how to wait instead"
    finally:
        assert stop(first) == 0


def test_standby_stopped_while_waiting_exits_zero_having_written_nothing(tmp_path: Path) -> None:
    db, url, first = _first_daemon(tmp_path)
    try:
        second = start_daemon(["-c", str(_config(tmp_path, "b", db, url))], tmp_path / "b.log")
        wait_for(lambda: "standby" in (tmp_path / "b.log").read_text(), 30, "second waits")
        assert stop(second) == 0
        assert "wrote nothing" in (tmp_path / "b.log").read_text()
        assert "Traceback" not in (tmp_path / "b.log").read_text()
    finally:
        assert stop(first) == 0


# -- leases between hosts (two database files standing for two hosts' copies) ------------------


def _s3(server: S3Server, tmp: Path, bucket: str) -> tuple[str, dict[str, str]]:
    url = f"s3://{bucket}/app?endpoint={server.endpoint_url}&path_style=true&region=us-east-1"
    return url, _env(server, tmp)


async def test_lapsed_lease_taken_over_fences_the_idle_daemon(
    moto_server: S3Server, tmp_path: Path
) -> None:
    """The rolling-deploy bug: A idle past its lease, B takes over and stops cleanly, then A
    commits.  A must stop writing, name the holder and exit 4; the newest restore is B's state,
    never A's commit spliced onto it.
    """
    bucket = unique_bucket()
    await create_bucket(moto_server, bucket)
    url, env = _s3(moto_server, tmp_path, bucket)
    a, b = _db(tmp_path / "a.db"), _db(tmp_path / "b.db")
    lease = "lease_duration = 2\n"
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    port = free_port()
    metrics = ["--metrics-addr", f"127.0.0.1:{port}"]
    first = start_daemon(
        ["-c", str(_config(tmp_path, "a", a, url, lease)), *metrics], a_log, env=env
    )
    try:
        wait_for(lambda: "snapshot uploaded" in a_log.read_text(), 30, "first up")
        second = start_daemon(["-c", str(_config(tmp_path, "b", b, url, lease))], b_log, env=env)
        try:
            wait_for(lambda: "waiting as a standby" in b_log.read_text(), 30, "b waits")
            wait_for(lambda: "lease lapsed" in b_log.read_text(), 30, "b sees the lapse")
            wait_for(lambda: "snapshot uploaded" in b_log.read_text(), 30, "b up")
            _write(b, 1, 5)
        finally:
            assert stop(second) == 0
        _write(a, 1, 3)
        wait_for(lambda: "lease lost" in a_log.read_text(), 30, "a to notice")
        status, body = _get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503
        assert "lease lost" in body
        _, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert 'replicad_lease_lost_total{db="a",replica="s30"} 1.0' in text, text
    finally:
        status_a = stop(first)
    text = a_log.read_text()
    assert status_a == 4, text[-3000:]
    assert str(b) in text, "the error names the new holder"
    assert "Traceback" not in text
    out = tmp_path / "out.db"
    result = await asyncio.to_thread(replicad, "restore", "-o", str(out), url, env=env)
    assert result.returncode == 0, result.stderr
    assert workload.dump(out) == workload.dump(b), "the newest state is B's, nothing spliced"


#: Runs replicad with the wall clock a minute ahead (argv as for `replicad`).
_CLOCK_AHEAD = """
import sys, time
real = time.time
time.time = lambda: real() + 60
from replicad.launch import main
raise SystemExit(main())
"""


async def test_a_clock_a_minute_ahead_does_not_take_over_a_live_lease(
    moto_server: S3Server, tmp_path: Path
) -> None:
    bucket = unique_bucket()
    await create_bucket(moto_server, bucket)
    url, env = _s3(moto_server, tmp_path, bucket)
    a, b = _db(tmp_path / "a.db"), _db(tmp_path / "b.db")
    first = start_daemon(
        ["-c", str(_config(tmp_path, "a", a, url, "lease_duration = 30\n"))],
        tmp_path / "a.log",
        env=env,
    )
    try:
        wait_for(lambda: "snapshot uploaded" in (tmp_path / "a.log").read_text(), 30, "a up")
        ahead = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", _CLOCK_AHEAD, "replicate", str(b), url, "--no-standby"],
            capture_output=True,
            text=True,
            env=clean_env(env),
            cwd=ROOT,
            timeout=120,
            check=False,
        )
        assert ahead.returncode == 1, ahead.stderr
        assert "is being written by" in ahead.stderr
        assert str(a) in ahead.stderr
    finally:
        assert stop(first) == 0


_CORRUPT = {
    "garbage": b"\x00\x01 not a lease",
    "expires_at 1e300": json.dumps(
        {"epoch": 1, "owner": "x", "host": "h", "pid": 1, "db": "/x.db", "expires_at": 1e300}
    ).encode(),
    "wrong types": json.dumps(
        {"epoch": "1", "owner": 7, "host": None, "pid": "p", "db": [], "expires_at": "soon"}
    ).encode(),
}


@pytest.mark.parametrize("kind", sorted(_CORRUPT))
def test_corrupt_lease_object_is_a_clear_error_and_takeover_works(
    tmp_path: Path, kind: str
) -> None:
    db = _db(tmp_path / "app.db")
    rep = tmp_path / "rep"
    (rep / "lease").mkdir(parents=True)
    (rep / "lease" / "0000000000000001").write_bytes(_CORRUPT[kind])
    refused = replicad("replicate", str(db), rep.as_uri(), timeout=60)
    assert refused.returncode == 1, refused.stderr
    assert "lease object lease/0000000000000001" in refused.stderr
    assert "is corrupt" in refused.stderr
    assert "--takeover" in refused.stderr
    assert "Traceback" not in refused.stderr
    log = tmp_path / "d.log"
    daemon = start_daemon([str(db), rep.as_uri(), "--takeover"], log)
    try:
        wait_for(lambda: "snapshot uploaded" in log.read_text(), 30, "takeover over garbage")
        _write(db, 1, 3)
    finally:
        assert stop(daemon) == 0
    out = tmp_path / "out.db"
    assert replicad("restore", "-o", str(out), rep.as_uri()).returncode == 0
    assert workload.dump(out) == workload.dump(db)


def test_standby_on_another_host_takes_the_lease_within_a_second_of_release(
    tmp_path: Path,
) -> None:
    """Two hosts (two database files) on one replica: the second waits on the lease, reading one
    key a second, and starts within about a second of the first's clean stop.
    """
    url = (tmp_path / "rep").as_uri()
    a, b = _db(tmp_path / "a.db"), _db(tmp_path / "b.db")
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    first = start_daemon(["-c", str(_config(tmp_path, "a", a, url))], a_log)
    second = None
    try:
        wait_for(lambda: "snapshot uploaded" in a_log.read_text(), 30, "first up")
        second = start_daemon(["-c", str(_config(tmp_path, "b", b, url))], b_log)
        wait_for(lambda: "waiting as a standby" in b_log.read_text(), 30, "second waits")
        assert str(a) in b_log.read_text(), "it names the holder"
        _write(b, 1, 4)  # committed while waiting: shipped once it takes over
        assert stop(first) == 0
        wait_for(lambda: "released the lease" in b_log.read_text(), 30, "handover")
        handover = _event_time(b_log, "released the lease") - _event_time(
            a_log, "everything committed was shipped"
        )
        print(f"lease handover: {handover:.3f} s after the first daemon's stop")
        assert handover < 5, "a standby reads the next epoch about once a second"
        wait_for(lambda: "snapshot uploaded" in b_log.read_text(), 30, "second up")
    finally:
        stop(first)
        status_b = stop(second) if second is not None else 0
    assert status_b == 0
    out = tmp_path / "out.db"
    assert replicad("restore", "-o", str(out), url).returncode == 0
    assert workload.dump(out) == workload.dump(b)


def _uploads_at_least(log: Path, count: int) -> Callable[[], bool]:
    return lambda: log.read_text().count("snapshot uploaded") >= count


def test_snapshot_of_an_unchanged_database_is_not_refused_by_create_only(tmp_path: Path) -> None:
    """Snapshots are written create-only now: asking twice with no commit in between names the
    same object with the same bytes, which must count as done rather than block the replica.
    Found here too: the second request, before the first snapshot was uploaded, used the same
    spool file, which releasing the first deleted; the daemon died with a traceback.
    """
    db, url, daemon = _first_daemon(tmp_path)
    log = tmp_path / "a.log"
    try:
        for n in (2, 3):  # each after the one before was uploaded (else it joins that one)
            assert replicad("snapshot", str(db)).returncode == 0
            wait_for(_uploads_at_least(log, n), 30, f"upload {n}")
        _write(db, 1, 2)
    finally:
        status = stop(daemon)
    assert status == 0, log.read_text()[-2000:]
    out = tmp_path / "out.db"
    assert replicad("restore", "-o", str(out), url).returncode == 0
    assert workload.dump(out) == workload.dump(db)
