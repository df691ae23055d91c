"""How S3ReplicaClient reports what goes wrong: the right error class, a message naming the
bucket and endpoint (never a secret), and quickly when the endpoint is unreachable.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import pytest

from replicad.clients.s3 import S3ReplicaClient
from replicad.errors import ConfigError, ReplicaAccessError, ReplicaUnavailableError
from tests.procs import free_port
from tests.s3servers import S3Server, create_bucket, unique_bucket

pytestmark = pytest.mark.usefixtures("isolated_aws_environment")

WRONG_SECRET = "wrong-secret-must-never-be-printed-7Hq2"


def fast(**settings: Any) -> dict[str, Any]:
    """Settings that give up quickly, overridden by `settings`."""
    return {"connect_timeout": 1.0, "read_timeout": 5.0, "max_attempts": 2} | settings


def full_report(exc: BaseException) -> str:
    """Everything a log or traceback could show about `exc`, causes included."""
    return "".join(traceback.format_exception(exc))


async def test_wrong_secret_is_an_access_error_naming_bucket_and_endpoint(
    rclone_server: S3Server,
) -> None:
    bucket = unique_bucket()
    await create_bucket(rclone_server, bucket)
    settings = rclone_server.client_kwargs(bucket) | {"secret_access_key": WRONG_SECRET}

    async with S3ReplicaClient(**fast(**settings)) as client:
        with pytest.raises(ReplicaAccessError) as caught:
            await client.list_objects()

    message = str(caught.value)
    assert bucket in message
    assert rclone_server.endpoint_url in message
    assert "check the access key" in message  # the hint
    assert WRONG_SECRET not in full_report(caught.value)
    assert client.stats.requests == {"LIST": 1}  # a 403 is not retried
    assert client.stats.errors == {"access": 1}


async def test_unknown_access_key_is_an_access_error(rclone_server: S3Server) -> None:
    bucket = unique_bucket()
    await create_bucket(rclone_server, bucket)
    settings = rclone_server.client_kwargs(bucket) | {"access_key_id": "NOSUCHKEY"}

    async with S3ReplicaClient(**fast(**settings)) as client:
        with pytest.raises(ReplicaAccessError, match=bucket) as caught:
            await client.put_object("k", b"v")
    assert "InvalidAccessKeyId" in str(caught.value)
    assert rclone_server.secret_access_key not in full_report(caught.value)


@pytest.mark.parametrize("server_name", ["rclone", "moto"])
async def test_missing_bucket_is_an_access_error(
    server_name: str, request: pytest.FixtureRequest
) -> None:
    server: S3Server = request.getfixturevalue(f"{server_name}_server")
    bucket = unique_bucket()  # never created

    async with S3ReplicaClient(**fast(**server.client_kwargs(bucket))) as client:
        for attempt in (
            client.list_objects(),
            client.put_object("k", b"v"),
            client.get_object("k"),
        ):
            with pytest.raises(ReplicaAccessError, match="NoSuchBucket") as caught:
                await attempt
            assert bucket in str(caught.value)
            assert "check the bucket name" in str(caught.value)


async def test_unreachable_endpoint_is_unavailable_quickly() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = S3ReplicaClient(
        bucket="b",
        endpoint_url=endpoint,
        region="us-east-1",
        access_key_id="AKID",
        secret_access_key=WRONG_SECRET,
        path_style=True,
        **fast(),
    )
    started = time.monotonic()
    async with client:
        with pytest.raises(ReplicaUnavailableError, match=endpoint) as caught:
            await client.get_object("k")

    assert time.monotonic() - started < 5
    assert client.stats.requests == {"GET": 2}  # both attempts counted
    assert WRONG_SECRET not in full_report(caught.value)


async def test_missing_credentials_are_an_access_error(moto_server: S3Server) -> None:
    settings = moto_server.client_kwargs("b") | {"access_key_id": None, "secret_access_key": None}

    async with S3ReplicaClient(**fast(**settings)) as client:
        with pytest.raises(ReplicaAccessError, match="no usable credentials"):
            await client.list_objects()


async def test_unknown_profile_is_a_config_error() -> None:
    client = S3ReplicaClient(bucket="b", region="us-east-1", profile="no-such-profile")
    with pytest.raises(ConfigError, match="no-such-profile"):
        await client.open()


def test_url_never_shows_endpoint_credentials() -> None:
    client = S3ReplicaClient(
        bucket="backups",
        prefix="/prod/db1/",
        endpoint_url="https://user:hunter2@s3.example.com:9000/",
        access_key_id="AKID",
        secret_access_key=WRONG_SECRET,
    )
    assert client.url == "s3://backups/prod/db1?endpoint=https://s3.example.com:9000/"
    assert S3ReplicaClient(bucket="b").url == "s3://b"


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3ReplicaClient(bucket="b", part_size=1 << 20)
    with pytest.raises(ValueError, match="both"):
        S3ReplicaClient(bucket="b", access_key_id="AKID")
