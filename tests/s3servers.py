"""Real S3 servers for the tests: `rclone serve s3` over a temporary directory, and moto.

Both listen on 127.0.0.1 only, on a free port, and run with a minimal explicit environment
(PATH, HOME, TMPDIR) so nothing from the developer's or CI machine's AWS, proxy or CA settings
reaches them.  Clients talking to them must be isolated the same way; see
`isolated_aws_environment` in conftest.py.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiobotocore.session import AioSession
from botocore.config import Config

from replicad.clients.base import ReplicaClient
from tests.procs import HOST, free_port

REGION = "us-east-1"
#: Deliberately not the "minioadmin"-style defaults, so a client silently using anything but
#: the credentials it was given fails.
ACCESS_KEY_ID = "REPLICADTESTKEY0001"
SECRET_ACCESS_KEY = "replicad-test-secret-Zq8v2LkW9xTr"  # a throwaway test secret
START_TIMEOUT = 20.0
START_ATTEMPTS = 3

#: Prefix inside each test's bucket, so prefix handling is exercised on every S3 test.
S3_PREFIX = "replicas/db1"
#: What the `make_replica_client` fixture returns: `await factory(**s3_settings)`.
ClientFactory = Callable[..., Awaitable[ReplicaClient]]


@dataclass
class S3Server:
    """One running server and what a client needs to reach it."""

    name: str
    endpoint_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    #: Whether PutObject honours `If-None-Match: *` (moto does; rclone serve s3 ignores it).
    enforces_conditional_writes: bool
    access_key_id: str = ACCESS_KEY_ID
    secret_access_key: str = SECRET_ACCESS_KEY
    region: str = REGION

    def client_kwargs(self, bucket: str, prefix: str = "") -> dict[str, Any]:
        """Keyword arguments for `S3ReplicaClient` pointing at `bucket` on this server."""
        return {
            "bucket": bucket,
            "prefix": prefix,
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "path_style": True,
            "conditional_writes": self.enforces_conditional_writes,
        }

    def stop(self) -> None:
        """Terminate the server and wait for it (kill if it lingers)."""
        stop_process(self.process)


def minimal_env(home: Path) -> dict[str, str]:
    """The only environment server processes get: no AWS_*, proxy or CA variables."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMPDIR": str(home)}


def child_env(server: S3Server, tmp: Path) -> dict[str, str]:
    """Extra environment for a replicad child process using `server` (pass to `procs.clean_env`
    or the `procs` helpers): credentials through the standard variables, no AWS config files,
    no instance-metadata lookups; nothing else from this machine's AWS setup.
    """
    return {
        "AWS_ACCESS_KEY_ID": server.access_key_id,
        "AWS_SECRET_ACCESS_KEY": server.secret_access_key,
        "AWS_CONFIG_FILE": str(tmp / "absent-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "absent-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def venv_binary(name: str) -> str:
    """A console script installed next to this interpreter (the virtualenv's bin)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed (pip install -e '.[test]')")
    return found


def start_rclone(workdir: Path) -> S3Server:
    """`rclone serve s3` serving `workdir/data` (each directory there is a bucket)."""
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)

    def command(port: int) -> list[str]:
        return [
            venv_binary("rclone"),
            "serve",
            "s3",
            "--addr",
            f"{HOST}:{port}",
            "--auth-key",
            f"{ACCESS_KEY_ID},{SECRET_ACCESS_KEY}",
            "--etag-hash",
            "MD5",
            "--config",
            str(workdir / "rclone.conf"),  # absent: nothing from ~/.config/rclone leaks in
            "--log-level",
            "NOTICE",
            f":local:{data}",
        ]

    return _start("rclone", command, workdir, enforces_conditional_writes=False)


def start_moto(workdir: Path) -> S3Server:
    """An in-memory moto S3 server."""

    def command(port: int) -> list[str]:
        return [venv_binary("moto_server"), "-H", HOST, "-p", str(port)]

    return _start("moto", command, workdir, enforces_conditional_writes=True)


def _start(
    name: str, command: Any, workdir: Path, *, enforces_conditional_writes: bool
) -> S3Server:
    """Start on a free port, retrying with another port if the first one was taken meanwhile."""
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        log_path = workdir / f"{name}-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=minimal_env(workdir),
                cwd=workdir,
            )
        endpoint = f"http://{HOST}:{port}"
        if _wait_until_answers(endpoint, process):
            return S3Server(name, endpoint, process, log_path, enforces_conditional_writes)
        stop_process(process)
    log_text = log_path.read_text(errors="replace")
    raise RuntimeError(f"{name} S3 server did not start; last log:\n{log_text}")


def _wait_until_answers(endpoint: str, process: subprocess.Popen[bytes]) -> bool:
    """Poll until any HTTP response comes back (403 counts: the server is up)."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with no_proxy.open(endpoint + "/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill after a grace period."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def unique_bucket() -> str:
    """A fresh DNS-compatible bucket name."""
    return f"t-{uuid.uuid4().hex[:16]}"


@functools.cache
def _session() -> AioSession:
    """One session for set-up clients: parsing the S3 model once saves ~0.2 s per test."""
    return AioSession()


def raw_client(server: S3Server) -> Any:
    """An aiobotocore client context for test set-up (bucket creation) with explicit settings."""
    config = Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 2, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return _session().create_client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key_id,
        aws_secret_access_key=server.secret_access_key,
        config=config,
    )


async def create_bucket(server: S3Server, bucket: str) -> None:
    """Create `bucket` on `server`."""
    async with raw_client(server) as s3:
        await s3.create_bucket(Bucket=bucket)


# -- raw downloads: the baseline a restore is compared with --------------------------------------

#: Read size of a raw download: what a plain streaming client would use.
DOWNLOAD_CHUNK = 1 << 20


async def list_sizes(s3: Any, bucket: str, prefix: str) -> dict[str, int]:
    """Key (relative to `prefix`) -> size of every object under `prefix`, in listing order."""
    found: dict[str, int] = {}
    async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update((o["Key"][len(prefix) :], o["Size"]) for o in page.get("Contents", ()))
    return found


async def stream_object(s3: Any, bucket: str, key: str, path: Path) -> int:
    """GET `key` into the file `path` in `DOWNLOAD_CHUNK` reads; bytes written."""
    response = await s3.get_object(Bucket=bucket, Key=key)
    written = 0
    async with response["Body"] as body:
        with path.open("wb") as sink:
            while chunk := await body.read(DOWNLOAD_CHUNK):
                sink.write(chunk)
                written += len(chunk)
    return written


async def download(s3: Any, bucket: str, keys: list[str], dest: Path, *, concurrency: int) -> int:
    """Stream `keys` to files ``object-N`` in `dest`, `concurrency` at a time; bytes written."""
    gate = asyncio.Semaphore(concurrency)
    sizes: list[int] = []

    async def get(n: int, key: str) -> None:
        async with gate:
            sizes.append(await stream_object(s3, bucket, key, dest / f"object-{n}"))

    async with asyncio.TaskGroup() as group:
        for n, key in enumerate(keys):
            group.create_task(get(n, key))
    return sum(sizes)
