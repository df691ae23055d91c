"""One writer per replica prefix: leases on conditional writes refuse a second daemon loudly."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from replicad.clients.file import FileReplicaClient
from replicad.lease import Lease, LeaseLostError
from tests import workload
from tests.procs import replicad, start_daemon, stop, wait_for
from tests.s3servers import S3Server, create_bucket, unique_bucket


async def test_lease_refuses_a_second_owner_until_expiry_or_takeover(tmp_path: Path) -> None:
    client = FileReplicaClient(tmp_path / "rep")
    first = Lease(client, db="/a.db", duration=0.5)
    await first.acquire()
    second = Lease(client, db="/b.db", duration=0.5)
    with pytest.raises(LeaseLostError, match="is being written by") as info:
        await second.acquire()
    assert "--takeover" in (info.value.hint or "")
    await second.acquire(takeover=True)
    await asyncio.sleep(0.4)
    with pytest.raises(LeaseLostError, match="taken over"):
        await first.ensure()  # renewal fails: the epoch it wanted is taken
    with pytest.raises(LeaseLostError):
        await first.ensure()  # and stays refused, without another request


async def test_lease_renews_and_expired_lease_can_be_claimed(tmp_path: Path) -> None:
    client = FileReplicaClient(tmp_path / "rep")
    lease = Lease(client, db="/a.db", duration=0.6)
    await lease.acquire()
    epoch = lease.epoch
    await lease.ensure()
    assert lease.epoch == epoch, "no renewal while most of the lease is left"
    await asyncio.sleep(0.45)
    await lease.ensure()
    assert lease.epoch == epoch + 1, "renewed with a third left"
    await asyncio.sleep(0.7)
    other = Lease(client, db="/b.db", duration=0.6)
    await other.acquire()  # expired: no takeover needed
    with pytest.raises(LeaseLostError):
        await lease.ensure()
    keys = [i.key for i in await client.list_objects("lease/")]
    assert len(keys) <= 4, "old epochs are deleted"


async def test_release_and_local_crash_recovery(tmp_path: Path) -> None:
    client = FileReplicaClient(tmp_path / "rep")
    lease = Lease(client, db="/a.db", duration=60)
    await lease.acquire()
    await lease.release()
    await Lease(client, db="/b.db", duration=60).acquire()  # released: claimable at once
    crashed = Lease(client, db="/c.db", duration=60, holds_local_lock=True)
    await crashed.acquire(takeover=True)
    restarted = Lease(client, db="/c.db", duration=60, holds_local_lock=True)
    await restarted.acquire()  # same host, same database, the local lock is ours: it was us


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
        refused = await asyncio.to_thread(replicad, "replicate", str(b), url, env=env, timeout=60)
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
                if "took this replica over" in (tmp_path / "a.log").read_text():
                    break
            else:
                raise AssertionError("the stale daemon never noticed the takeover")
            await asyncio.sleep(1.5)
        finally:
            assert stop(second) == 0
    finally:
        status_a = stop(first)
    assert status_a == 3, "the fenced daemon could not ship what it captured: it must say so"
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
