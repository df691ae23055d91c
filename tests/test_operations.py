"""Running replicad as operators do: exec mode, systemd notifications, health, config check."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests import workload
from tests.faultproxy import FaultProxy
from tests.procs import ROOT, WORKLOAD, free_port, replicad, start_daemon, stop
from tests.s3servers import S3Server, create_bucket, unique_bucket


def _make_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    workload.setup(conn)
    conn.close()


def test_exec_runs_the_app_flushes_and_passes_its_exit_code(tmp_path: Path) -> None:
    db, rep = tmp_path / "app.db", tmp_path / "rep"
    _make_db(db)
    argv = [str(WORKLOAD), str(db), "--count", "80", "--rate", "400", "--log", str(tmp_path / "w")]
    app = (
        f"import runpy,sys; sys.argv={argv!r}; "
        f"runpy.run_path({str(WORKLOAD)!r}, run_name='__main__'); sys.exit(7)"
    )
    result = replicad("exec", str(db), rep.as_uri(), "--", sys.executable, "-c", app, timeout=60)
    assert result.returncode == 7, result.stderr[-2000:]
    out = tmp_path / "out.db"
    assert replicad("restore", "-o", str(out), rep.as_uri()).returncode == 0
    assert workload.seq_of(out) == 80
    assert workload.dump(out) == workload.dump(db)


def test_exec_forwards_signals_to_the_app(tmp_path: Path) -> None:
    db, rep = tmp_path / "app.db", tmp_path / "rep"
    _make_db(db)
    marker = tmp_path / "got-term"
    app = (
        "import signal,sys,time,pathlib\n"
        f"def bye(*_): pathlib.Path('{marker}').write_text('x'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "replicad",
            "exec",
            str(db),
            rep.as_uri(),
            "--",
            sys.executable,
            "-c",
            app,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"up"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert marker.exists()


def test_exec_without_a_command_is_refused() -> None:
    result = replicad("exec", "a.db", "file:///tmp/x")
    assert result.returncode == 2
    assert "after --" in result.stderr


def test_systemd_notifications(tmp_path: Path) -> None:
    db, rep = tmp_path / "app.db", tmp_path / "rep"
    _make_db(db)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    daemon = start_daemon([str(db), rep.as_uri()], tmp_path / "d.log", env=env)
    try:
        messages: list[str] = []
        while not any(m.startswith("WATCHDOG=1") for m in messages):
            messages.append(sock.recv(4096).decode())
        assert messages[0].startswith("READY=1")
        assert "STATUS=replicating 1 database(s)" in messages[0]
    finally:
        assert stop(daemon) == 0
    rest = []
    sock.settimeout(1)
    try:
        while True:
            rest.append(sock.recv(4096).decode())
    except TimeoutError:
        pass
    sock.close()
    assert "STOPPING=1" in rest


@pytest.mark.parametrize("name", ["replicad.service", "replicad-follow.service"])
def test_systemd_unit_verifies(tmp_path: Path, name: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    unit = (ROOT / "deploy" / name).read_text()
    assert "/usr/local/bin/replicad" in unit
    # Point ExecStart at the installed command, since verify checks that it exists.
    here = Path(sys.executable).with_name("replicad")
    (tmp_path / name).write_text(unit.replace("/usr/local/bin/replicad", str(here)))
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / name)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""
    timeout_stop = int(unit.split("TimeoutStopSec=")[1].split("s")[0])
    assert timeout_stop > 30, "TimeoutStopSec must exceed the default shutdown_timeout"


def test_config_check_masks_secrets_and_reports_errors(tmp_path: Path) -> None:
    env = {"R2_ACCESS_KEY_ID": "AKID-visible-is-ok", "R2_SECRET_ACCESS_KEY": "s3cr3t-never-shown"}
    result = replicad("config", "check", "-c", str(ROOT / "config.example.toml"), env=env)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["databases"][0]["checkpoints"]["checkpoint_pages"] == 1000
    assert "s3cr3t" not in result.stdout
    assert effective["databases"][0]["replicas"][1]["s3"]["secret_access_key"] == "***"
    bad = tmp_path / "bad.toml"
    bad.write_text("[[databases]]\npath = 'x.db'\ncheckpoint_pagez = 3\n")
    result = replicad("config", "check", "-c", str(bad))
    assert result.returncode == 2
    assert "checkpoint_pagez: unknown key" in result.stderr


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except urllib.error.URLError:
        return 0, {}  # not listening yet


async def _until(url: str, status: int, seconds: float) -> dict[str, object]:
    deadline = time.monotonic() + seconds
    while True:
        code, body = await asyncio.to_thread(_get, url)
        if code == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} stayed {code}: {body}")
        await asyncio.sleep(0.2)


async def test_readiness_follows_the_s3_server(rclone_server: S3Server, tmp_path: Path) -> None:
    bucket = unique_bucket()
    await create_bucket(rclone_server, bucket)
    db = tmp_path / "app.db"
    _make_db(db)
    port = free_port()
    env = {
        "AWS_ACCESS_KEY_ID": rclone_server.access_key_id,
        "AWS_SECRET_ACCESS_KEY": rclone_server.secret_access_key,
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    async with FaultProxy(rclone_server.endpoint_url) as proxy:
        url = f"s3://{bucket}/app?endpoint={proxy.url}&path_style=true&region=us-east-1"
        config = tmp_path / "c.toml"
        config.write_text(
            f"ready_max_lag = 1.5\nmetrics_addr = '127.0.0.1:{port}'\n"
            f"[[databases]]\npath = '{db}'\n[[databases.replicas]]\nurl = '{url}'\n"
        )
        daemon = start_daemon(["-c", str(config)], tmp_path / "d.log", env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            await _until(f"{base}/readyz", 200, 30)
            assert (await asyncio.to_thread(_get, f"{base}/healthz"))[0] == 200
            proxy.pause()
            conn = sqlite3.connect(db, isolation_level=None)
            workload.apply_txn(conn, 2, 1)
            body = await _until(f"{base}/readyz", 503, 20)
            assert "unshipped" in json.dumps(body)
            assert (await asyncio.to_thread(_get, f"{base}/healthz"))[0] == 200
            await proxy.resume()
            await _until(f"{base}/readyz", 200, 40)
            conn.close()
        finally:
            status = await asyncio.to_thread(stop, daemon)
    assert status == 0
