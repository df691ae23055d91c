"""S3ReplicaClient against a flaky network: moto behind `FaultProxy`."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from replicad.clients.s3 import MIN_PART_SIZE, S3ReplicaClient
from replicad.errors import ObjectExistsError, ReplicaUnavailableError
from tests.faultproxy import FaultProxy
from tests.s3servers import S3Server, create_bucket, unique_bucket

pytestmark = pytest.mark.usefixtures("isolated_aws_environment")

#: Seeded, so every run sees the same faults in the same places.
SEED = 1


@pytest.fixture
async def bucket(moto_server: S3Server) -> str:
    name = unique_bucket()
    await create_bucket(moto_server, name)
    return name


@pytest.fixture
async def flaky_proxy(moto_server: S3Server) -> AsyncIterator[FaultProxy]:
    """About one request in five fails: 500/503, dropped before or after reaching moto."""
    proxy = FaultProxy(
        moto_server.endpoint_url,
        error_rate=0.10,
        drop_rate=0.05,
        drop_after_forward_rate=0.05,
        latency_rate=0.10,
        latency=0.02,
        seed=SEED,
    )
    async with proxy:
        yield proxy


def through(proxy: FaultProxy, server: S3Server, bucket: str, **settings: Any) -> S3ReplicaClient:
    """A client for `bucket` on `server`, reaching it via `proxy`."""
    kwargs = server.client_kwargs(bucket, "flaky") | {
        "endpoint_url": proxy.url,
        "connect_timeout": 1.0,
        "read_timeout": 5.0,
        "max_attempts": 8,
    }
    return S3ReplicaClient(**(kwargs | settings))


async def test_operations_succeed_through_twenty_percent_faults(
    flaky_proxy: FaultProxy, moto_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    keys = [f"segments/00/{i:04d}" for i in range(15)]
    big = tmp_path / "snapshot.db"
    big.write_bytes(os.urandom(MIN_PART_SIZE + 100_000))

    # One part at a time: requests then arrive in a fixed order, so the seeded faults do too.
    settings = {"part_size": MIN_PART_SIZE, "concurrency": 1}
    async with through(flaky_proxy, moto_server, bucket, **settings) as client:
        for key in keys:
            await client.put_object(key, key.encode() * 100, create_only=True)
        for key in keys:
            assert await client.get_object(key) == key.encode() * 100
        assert [o.key for o in await client.list_objects("segments/")] == keys
        await client.put_file("snapshots/0001", big)
        digest = hashlib.sha256()
        async for chunk in client.iter_object("snapshots/0001"):
            digest.update(chunk)
        assert digest.hexdigest() == hashlib.sha256(big.read_bytes()).hexdigest()
        await client.delete_objects(keys[:10])
        assert [o.key for o in await client.list_objects("segments/")] == keys[10:]
        with pytest.raises(ObjectExistsError):  # fencing still works: this one is not ours
            await client.put_object(keys[-1], b"another writer", create_only=True)

    injected = flaky_proxy.injected
    assert injected["error"] >= 3
    assert injected["drop"] + injected["drop_after_forward"] >= 3
    assert flaky_proxy.total_requests > 2 * len(keys) + 12  # retries happened
    # Every attempt botocore made is counted; aiohttp's own silent resend of an idempotent
    # request on a dropped kept-alive connection is invisible to it, hence <=.
    attempts = sum(client.stats.requests.values())
    assert 2 * len(keys) + 12 < attempts <= flaky_proxy.total_requests
    assert client.stats.errors == {"exists": 1}  # only the real conflict surfaced


async def test_lost_response_to_a_create_only_put_is_not_a_conflict(
    moto_server: S3Server, bucket: str
) -> None:
    async with (
        FaultProxy(moto_server.endpoint_url) as proxy,
        through(proxy, moto_server, bucket) as client,
    ):
        proxy.force("drop_after_forward", method="PUT")  # lands in moto, answer lost

        await client.put_object("segments/lock", b"mine", create_only=True)

        assert await client.get_object("segments/lock") == b"mine"
        assert client.stats.requests["HEAD"] == 1  # the 412 was checked against our bytes
        assert client.stats.errors == {}


@pytest.mark.parametrize("server_name", ["rclone", "moto"])
async def test_lost_response_to_complete_multipart_is_success(
    server_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """moto completes the retried request again; rclone answers NoSuchUpload to the retry,
    and the client recognises its object by the ETag (rclone's is the whole file's MD5).
    """
    server: S3Server = request.getfixturevalue(f"{server_name}_server")
    bucket = unique_bucket()
    await create_bucket(server, bucket)
    source = tmp_path / "snapshot.db"
    source.write_bytes(os.urandom(MIN_PART_SIZE + 1))
    async with (
        FaultProxy(server.endpoint_url) as proxy,
        through(proxy, server, bucket, part_size=MIN_PART_SIZE) as client,
    ):
        proxy.force("drop_after_forward", method="POST", target_contains="uploadId=")

        await client.put_file("snapshots/0001", source)

        assert await client.get_object("snapshots/0001") == source.read_bytes()
        assert client.stats.requests["COMPLETE_MULTIPART"] == 2
        assert client.stats.errors == {}
        assert "ABORT_MULTIPART" not in client.stats.requests


async def test_paused_server_is_unavailable_until_resumed(
    moto_server: S3Server, bucket: str
) -> None:
    async with (
        FaultProxy(moto_server.endpoint_url, seed=SEED) as proxy,
        through(proxy, moto_server, bucket, max_attempts=2) as client,
    ):
        await client.put_object("k", b"before")

        proxy.pause()
        started = time.monotonic()
        with pytest.raises(ReplicaUnavailableError, match=proxy.url):
            await client.get_object("k")
        with pytest.raises(ReplicaUnavailableError):
            await client.put_object("k", b"during")
        assert time.monotonic() - started < 5

        await proxy.resume()
        assert await client.get_object("k") == b"before"
    assert client.stats.errors == {"unavailable": 2}
