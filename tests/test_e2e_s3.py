"""End to end against real S3 servers on 127.0.0.1: a daemon process, a writer process, restore."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests import workload
from tests.faultproxy import FaultProxy
from tests.procs import replicad, start_daemon, start_writer, stop, wait_for_async
from tests.s3servers import S3Server, child_env, create_bucket, raw_client, unique_bucket


def _url(bucket: str, endpoint: str) -> str:
    return f"s3://{bucket}/apps/app1?endpoint={endpoint}&path_style=true&region=us-east-1"


def _make_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    workload.setup(conn)
    conn.close()


async def _count_snapshots(server: S3Server, bucket: str) -> int:
    async with raw_client(server) as s3:
        listing = await s3.list_objects_v2(Bucket=bucket, Prefix="apps/app1/snapshots/")
    return len(listing.get("Contents", []))


async def _wait_snapshot(server: S3Server, bucket: str, seconds: float = 30) -> None:
    async def snapshot() -> bool:
        return await _count_snapshots(server, bucket) > 0

    await wait_for_async(snapshot, seconds, "a snapshot in the bucket", interval=0.1)


async def _wait_process(proc: subprocess.Popen[bytes], seconds: float) -> int:
    """The exit status, polled without blocking the loop (which runs the fault proxy)."""
    await wait_for_async(lambda: proc.poll() is not None, seconds, "the process to finish")
    return proc.returncode


async def _restore_equals(url: str, env: dict[str, str], tmp: Path, db: Path) -> None:
    out = tmp / "restored.db"
    result = await asyncio.to_thread(replicad, "restore", "-o", str(out), url, env=env)
    assert result.returncode == 0, result.stderr
    assert workload.integrity(out) == "ok"
    assert workload.dump(out) == workload.dump(db)


@pytest.mark.parametrize("backend", ["rclone", "moto"])
async def test_replicate_and_restore_through_s3(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server: S3Server = request.getfixturevalue(f"{backend}_server")
    bucket = unique_bucket()
    await create_bucket(server, bucket)
    db, env = tmp_path / "app.db", child_env(server, tmp_path)
    _make_db(db)
    url = _url(bucket, server.endpoint_url)
    daemon = start_daemon([str(db), url], tmp_path / "d.log", env=env)
    try:
        await _wait_snapshot(server, bucket)
        writer = start_writer(db, tmp_path / "w.log", seed=21, count=600, rate=300)
        assert await _wait_process(writer, 60) == 0
    finally:
        status = stop(daemon)
    assert status == 0, (tmp_path / "d.log").read_text()[-3000:]
    await _restore_equals(url, env, tmp_path, db)


async def test_replication_survives_faults_and_an_outage(
    rclone_server: S3Server, tmp_path: Path
) -> None:
    """5xx, dropped connections, latency and a 2.5 s outage: nothing committed is lost."""
    bucket = unique_bucket()
    await create_bucket(rclone_server, bucket)
    db, env = tmp_path / "app.db", child_env(rclone_server, tmp_path)
    _make_db(db)
    async with FaultProxy(
        rclone_server.endpoint_url,
        error_rate=0.15,
        drop_rate=0.05,
        drop_after_forward_rate=0.05,
        latency_rate=0.2,
        latency=0.1,
        seed=7,
    ) as proxy:
        config = tmp_path / "c.toml"
        config.write_text(  # frequent uploads, so many requests meet the faults
            f"[[databases]]\npath = '{db}'\nsync_interval = 0.1\n"
            f"[[databases.replicas]]\nurl = '{_url(bucket, proxy.url)}'\n"
        )
        daemon = start_daemon(["-c", str(config)], tmp_path / "d.log", env=env)
        try:
            await _wait_snapshot(rclone_server, bucket, seconds=60)
            # More consecutive failures than the client's own attempts: the daemon must retry.
            for kind in ("error", "drop", "drop_after_forward"):
                proxy.force(kind, method="PUT", times=3)
            wlog = tmp_path / "w.log"
            writer = start_writer(db, wlog, seed=22, count=1800, rate=300)
            await wait_for_async(
                lambda: len(workload.read_log(wlog)) >= 600,
                60,
                "600 commits before the outage",
            )
            proxy.pause()
            await asyncio.sleep(2.5)  # the outage: the server is unreachable this long
            await proxy.resume()
            assert await _wait_process(writer, 60) == 0
        finally:
            status = await asyncio.to_thread(stop, daemon, signal.SIGTERM, 90)
        assert sum(proxy.injected.values()) >= 9, (proxy.requests, proxy.injected)
    log = (tmp_path / "d.log").read_text()
    assert "upload failed; will retry" in log
    assert status == 0, log[-3000:]
    await _restore_equals(_url(bucket, rclone_server.endpoint_url), env, tmp_path, db)


async def test_two_replicas_file_and_s3(moto_server: S3Server, tmp_path: Path) -> None:
    bucket = unique_bucket()
    await create_bucket(moto_server, bucket)
    db, env = tmp_path / "app.db", child_env(moto_server, tmp_path)
    _make_db(db)
    url = _url(bucket, moto_server.endpoint_url)
    config = tmp_path / "c.toml"
    config.write_text(
        f"[[databases]]\npath = '{db}'\n"
        f"[[databases.replicas]]\nname = 'local'\nurl = '{(tmp_path / 'rep').as_uri()}'\n"
        f"[[databases.replicas]]\nname = 's3'\nurl = '{url}'\n"
    )
    daemon = start_daemon(["-c", str(config)], tmp_path / "d.log", env=env)
    try:
        await _wait_snapshot(moto_server, bucket)
        writer = start_writer(db, tmp_path / "w.log", seed=23, count=300, rate=300)
        assert await _wait_process(writer, 60) == 0
    finally:
        status = stop(daemon)
    assert status == 0
    await _restore_equals(url, env, tmp_path, db)
    (tmp_path / "restored.db").unlink()
    await _restore_equals((tmp_path / "rep").as_uri(), env, tmp_path, db)


async def test_huge_transaction_is_spooled_and_shipped_with_fencing_on(
    moto_server: S3Server, tmp_path: Path
) -> None:
    """A 24 MB commit goes through the spool and a create-only multipart upload (moto enforces
    If-None-Match, so the lease is on); the restore has every row.
    """
    bucket = unique_bucket()
    await create_bucket(moto_server, bucket)
    db, env = tmp_path / "app.db", child_env(moto_server, tmp_path)
    _make_db(db)
    url = _url(bucket, moto_server.endpoint_url)
    log = tmp_path / "d.log"
    daemon = start_daemon([str(db), url], log, env=env)
    try:
        await _wait_snapshot(moto_server, bucket)
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("CREATE TABLE big(b BLOB)")
        conn.execute("BEGIN")
        for _ in range(240):  # random bytes: the segment stays above one 8 MiB part
            conn.execute("INSERT INTO big VALUES (randomblob(100000))")
        conn.execute("COMMIT")
        conn.close()

        async def largest_segment() -> int:
            async with raw_client(moto_server) as s3:
                listing = await s3.list_objects_v2(Bucket=bucket, Prefix="apps/app1/segments/00/")
            return max((o["Size"] for o in listing.get("Contents", [])), default=0)

        async def uploaded() -> bool:
            return await largest_segment() > 16 << 20

        # Shipped by the upload loop, not by the shutdown's flush.
        await wait_for_async(uploaded, 60, "the 24 MB segment in the bucket", log=log, interval=0.2)
    finally:
        status = stop(daemon)
    assert status == 0, log.read_text()[-3000:]
    assert "fencing is off" not in log.read_text()
    await _restore_equals(url, env, tmp_path, db)
