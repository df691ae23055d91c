"""Shared fixtures. Each section belongs to one area of the code; add new areas as new sections."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from replicad.clients.base import ReplicaClient
from replicad.clients.file import FileReplicaClient
from replicad.clients.s3 import S3ReplicaClient
from replicad.testing import MemoryReplicaClient
from tests.s3servers import (
    S3_PREFIX,
    ClientFactory,
    S3Server,
    create_bucket,
    start_moto,
    start_rclone,
    unique_bucket,
)

# =================================================================================================
# Storage backends: real S3 servers (rclone serve s3, moto) and a `replica_client` per backend
# =================================================================================================

#: Backends the contract suite runs against; "rclone" and "moto" are real S3 servers, "memory"
#: is the `replicad.testing.MemoryReplicaClient` shipped for tests of code that uses replicad.
BACKENDS = ["file", "memory", "rclone", "moto"]
#: The backends that are S3 servers.
S3_BACKENDS = ("rclone", "moto")
#: Settings for test clients: fail fast rather than wait out production timeouts.
FAST_S3_SETTINGS: dict[str, Any] = {"connect_timeout": 2.0, "read_timeout": 20.0, "max_attempts": 3}
# Variables that would otherwise steer botocore or aiohttp: credentials, profiles, regions,
# CA bundles, proxies.  (AWS_* is matched by prefix.)
_LEAKY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)


@pytest.fixture(scope="session")
def rclone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """`rclone serve s3` over a temporary directory, for the whole session."""
    server = start_rclone(tmp_path_factory.mktemp("rclone"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An in-memory moto S3 server, for the whole session."""
    server = start_moto(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture
def isolated_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide the machine's AWS_*, proxy and CA variables and AWS config files from botocore.

    Test clients pass endpoint, region and credentials explicitly; this makes sure nothing
    else (a CA bundle for a corporate proxy, a default profile, an HTTPS_PROXY) changes what
    they do, and that the instance-metadata credential lookup never waits on the network.
    """
    for name in list(os.environ):
        if name.startswith("AWS_") or name.upper() in _LEAKY_VARIABLES:
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend under test; override with `@pytest.mark.parametrize("backend", [...])`."""
    name: str = request.param
    return name


@pytest.fixture
def s3_server(backend: str, request: pytest.FixtureRequest) -> S3Server | None:
    """The running server for an S3 backend (started on first use), None for the others."""
    if backend not in S3_BACKENDS:
        return None
    server: S3Server = request.getfixturevalue(f"{backend}_server")
    return server


@pytest.fixture
async def make_replica_client(
    backend: str, s3_server: S3Server | None, tmp_path: Path, isolated_aws_environment: None
) -> AsyncIterator[ClientFactory]:
    """A factory of opened clients all sharing one fresh replica (directory or bucket).

    Keyword arguments are `S3ReplicaClient` settings overriding the test defaults; the file
    backend has none and ignores them.  Every client made is closed at teardown.
    """
    made: list[ReplicaClient] = []
    bucket = unique_bucket()
    memory = MemoryReplicaClient()  # one store shared by every client the factory makes
    if s3_server is not None:
        await create_bucket(s3_server, bucket)

    async def factory(**s3_settings: Any) -> ReplicaClient:
        client: FileReplicaClient | MemoryReplicaClient | S3ReplicaClient
        if backend == "memory":
            client = memory
        elif s3_server is None:
            client = FileReplicaClient(tmp_path / "replica")
        else:
            settings = s3_server.client_kwargs(bucket, S3_PREFIX) | FAST_S3_SETTINGS | s3_settings
            client = S3ReplicaClient(**settings)
        await client.open()
        made.append(client)
        return client

    yield factory
    for client in made:
        await client.close()


@pytest.fixture
async def replica_client(make_replica_client: ClientFactory) -> ReplicaClient:
    """An opened client on a fresh, empty replica of the current `backend`."""
    return await make_replica_client()


# =================================================================================================
# Time: a wall clock the test moves, for schedules measured in wall time (snapshots, retention)
# =================================================================================================


class WallClock:
    """Stands in for `time.time` and `time.time_ns`; monotonic time (asyncio's) is untouched.

    Snapshot schedules, retention windows and compaction buckets compare object times with the
    wall clock; a test that moves this clock explicitly drives them without sleeping and
    without racing a loaded machine.
    """

    def __init__(self, start_ns: int) -> None:
        self.ns = start_ns

    def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds`."""
        self.ns += round(seconds * 1e9)

    def time(self) -> float:
        """Like `time.time`."""
        return self.ns / 1e9

    def time_ns(self) -> int:
        """Like `time.time_ns`."""
        return self.ns


@pytest.fixture
def wall_clock(monkeypatch: pytest.MonkeyPatch) -> WallClock:
    """Freeze the wall clock at the current time for the test; it moves only by `advance`."""
    clock = WallClock(time.time_ns())
    monkeypatch.setattr(time, "time", clock.time)
    monkeypatch.setattr(time, "time_ns", clock.time_ns)
    return clock
