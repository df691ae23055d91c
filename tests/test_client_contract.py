"""The ReplicaClient contract, run against every backend: a directory, rclone serve s3, moto.

Each test gets a fresh replica (a temporary directory, or a new bucket) from `replica_client`
or `make_replica_client` in conftest.py.  Backend-specific behaviour is tested at the end.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from replicad.clients.base import ObjectInfo, ReplicaClient
from replicad.clients.file import TEMP_PREFIX, FileReplicaClient
from replicad.clients.s3 import MIN_PART_SIZE, S3ReplicaClient
from replicad.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    ReplicaAccessError,
    ReplicaUnavailableError,
)
from tests.conftest import S3_BACKENDS
from tests.s3servers import S3_PREFIX, ClientFactory, S3Server, raw_client

MIB = 1 << 20


def write_random_file(path: Path, size: int) -> str:
    """Fill `path` with `size` random bytes; their SHA-256."""
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


async def test_put_get_round_trip(replica_client: ReplicaClient) -> None:
    payload = os.urandom(70_000)
    await replica_client.put_object("segments/00/a.seg", payload)
    await replica_client.put_object("empty", b"")

    assert await replica_client.get_object("segments/00/a.seg") == payload
    assert await replica_client.get_object("empty") == b""


async def test_put_replaces_existing_object(replica_client: ReplicaClient) -> None:
    await replica_client.put_object("k", b"first version")
    await replica_client.put_object("k", b"second")

    assert await replica_client.get_object("k") == b"second"
    assert await replica_client.list_objects() == [ObjectInfo("k", 6)]


async def test_new_replica_lists_empty(replica_client: ReplicaClient) -> None:
    assert await replica_client.list_objects() == []
    assert await replica_client.list_objects("snapshots/") == []


async def test_list_is_sorted_with_sizes_and_filters_by_prefix(
    replica_client: ReplicaClient,
) -> None:
    keys = ["segments/01/b", "snapshots/2", "segments/00/c", "snapshots/1", "segments/00/a", "z"]
    for i, key in enumerate(keys):
        await replica_client.put_object(key, b"x" * i)

    listed = await replica_client.list_objects()
    assert [o.key for o in listed] == sorted(keys)
    assert {o.key: o.size for o in listed} == {key: i for i, key in enumerate(keys)}
    assert [o.key for o in await replica_client.list_objects("segments/00/")] == [
        "segments/00/a",
        "segments/00/c",
    ]
    # A prefix that ends inside a name component filters on the whole key, not directories.
    assert [o.key for o in await replica_client.list_objects("snap")] == [
        "snapshots/1",
        "snapshots/2",
    ]
    assert await replica_client.list_objects("nothing-here/") == []


@pytest.mark.parametrize("backend", ["rclone", "moto"])
async def test_list_follows_continuation_tokens(make_replica_client: ClientFactory) -> None:
    client = await make_replica_client(list_page_size=3)
    keys = [f"segments/00/{i:04d}" for i in range(8)]
    for key in keys:
        await client.put_object(key, b"-")

    assert [o.key for o in await client.list_objects("segments/")] == keys
    assert client.stats.requests["LIST"] == 3


@pytest.mark.parametrize("backend", ["rclone"])  # the fastest server to fill with 1100 keys
async def test_list_more_than_one_default_page(replica_client: ReplicaClient) -> None:
    keys = [f"k/{i:05d}" for i in range(1100)]
    limit = asyncio.Semaphore(16)

    async def put(key: str) -> None:
        async with limit:
            await replica_client.put_object(key, b"")

    async with asyncio.TaskGroup() as group:
        for key in keys:
            group.create_task(put(key))

    assert [o.key for o in await replica_client.list_objects()] == keys
    assert replica_client.stats.requests["LIST"] == 2


async def test_list_between_bounds(replica_client: ReplicaClient) -> None:
    keys = [f"segments/00/{i:04d}" for i in range(10)] + ["segments/01/0005", "z"]
    for key in keys:
        await replica_client.put_object(key, b"-")

    async def listed(prefix: str = "", **bounds: str) -> list[str]:
        return [o.key for o in await replica_client.list_objects(prefix, **bounds)]

    level0 = "segments/00/"
    assert await listed(level0, start_after=f"{level0}0003") == keys[4:10]
    assert await listed(level0, end_before=f"{level0}0006") == keys[:6]
    assert await listed(level0, start_after=f"{level0}0003", end_before=f"{level0}0006") == [
        f"{level0}0004",
        f"{level0}0005",
    ]
    # Bounds need not be keys: a key's prefix starts a listing at that key.
    assert await listed(level0, start_after=f"{level0}0007x") == keys[8:10]
    assert await listed(level0, start_after=f"{level0}0008", end_before=f"{level0}0009") == []
    assert await listed(level0, start_after="a") == keys[:10]
    assert await listed(level0, end_before="a") == []
    assert await listed(start_after=f"{level0}0008") == [keys[9], "segments/01/0005", "z"]
    assert await listed("nothing/", start_after="a", end_before="zz") == []


@pytest.mark.parametrize("backend", ["rclone", "moto"])
async def test_bounded_list_skips_and_stops_paging(make_replica_client: ClientFactory) -> None:
    client = await make_replica_client(list_page_size=2)
    keys = [f"segments/00/{i:04d}" for i in range(12)]
    for key in keys:
        await client.put_object(key, b"-")

    listed = await client.list_objects("segments/", start_after=keys[5], end_before=keys[8])
    assert [o.key for o in listed] == keys[6:8]
    # Pages (6, 7) and (8, 9); the second reaches the bound, so paging stops there.
    assert client.stats.requests["LIST"] == 2


async def test_list_dirs_names_the_next_level(replica_client: ReplicaClient) -> None:
    assert await replica_client.list_dirs() == []
    for key in ["segments/00/a", "segments/03/b", "segments/03/c/d", "snapshots/s", "top"]:
        await replica_client.put_object(key, b"-")

    assert await replica_client.list_dirs() == ["segments", "snapshots"]
    assert await replica_client.list_dirs("segments/") == ["00", "03"]
    assert await replica_client.list_dirs("segments/03/") == ["c"]
    assert await replica_client.list_dirs("nothing/") == []
    with pytest.raises(ValueError, match="ending in '/'"):
        await replica_client.list_dirs("segments")


async def test_get_missing_raises_not_found(replica_client: ReplicaClient) -> None:
    with pytest.raises(ObjectNotFoundError, match="missing/key"):
        await replica_client.get_object("missing/key")


async def test_iter_object_streams_bounded_chunks(replica_client: ReplicaClient) -> None:
    payload = os.urandom(300_000)
    await replica_client.put_object("big", payload)

    chunks = [chunk async for chunk in replica_client.iter_object("big", chunk_size=64 * 1024)]

    assert b"".join(chunks) == payload
    assert all(0 < len(chunk) <= 64 * 1024 for chunk in chunks)
    assert len(chunks) >= 5


async def test_get_range_reads_exactly_the_range(replica_client: ReplicaClient) -> None:
    payload = os.urandom(100_000)
    await replica_client.put_object("ranged", payload)
    downloaded = replica_client.stats.bytes_downloaded
    for start, length in ((0, 10), (99_990, 10), (50_000, 30_000), (0, 100_000), (99_995, 10)):
        assert (
            await replica_client.get_range("ranged", start, length)
            == payload[start : start + length]
        )
    assert replica_client.stats.bytes_downloaded - downloaded == 10 + 10 + 30_000 + 100_000 + 5
    with pytest.raises(ObjectNotFoundError):
        await replica_client.get_range("nope", 0, 10)


async def test_iter_object_missing_raises_not_found(replica_client: ReplicaClient) -> None:
    with pytest.raises(ObjectNotFoundError):
        async for _ in replica_client.iter_object("nope"):
            pass


async def test_iter_object_closed_early_leaves_client_usable(replica_client: ReplicaClient) -> None:
    await replica_client.put_object("big", os.urandom(200_000))
    stream = replica_client.iter_object("big", chunk_size=1024)
    assert len(await anext(stream)) <= 1024
    await stream.aclose()  # type: ignore[attr-defined]  # an async generator in every backend

    assert await replica_client.get_object("big") != b""


async def test_put_file_small(replica_client: ReplicaClient, tmp_path: Path) -> None:
    source = tmp_path / "small.db"
    source.write_bytes(b"sqlite snapshot bytes")

    await replica_client.put_file("snapshots/s1", source)

    assert await replica_client.get_object("snapshots/s1") == b"sqlite snapshot bytes"
    assert replica_client.stats.requests.get("PUT") == 1


async def test_put_file_large_uses_multipart(
    make_replica_client: ClientFactory, backend: str, tmp_path: Path
) -> None:
    client = await make_replica_client(part_size=MIN_PART_SIZE, concurrency=2)
    source = tmp_path / "large.db"
    expected = write_random_file(source, 12 * MIB + 12_345)

    await client.put_file("snapshots/big", source)

    digest = hashlib.sha256()
    async for chunk in client.iter_object("snapshots/big"):
        digest.update(chunk)
    assert digest.hexdigest() == expected
    assert await client.list_objects() == [ObjectInfo("snapshots/big", 12 * MIB + 12_345)]
    if backend in S3_BACKENDS:
        requests = client.stats.requests
        assert (requests["CREATE_MULTIPART"], requests["UPLOAD_PART"]) == (1, 3)
        assert requests["COMPLETE_MULTIPART"] == 1
        assert "PUT" not in requests
    assert client.stats.bytes_uploaded == 12 * MIB + 12_345


async def test_delete_removes_keys_and_ignores_missing(replica_client: ReplicaClient) -> None:
    for key in ("a/1", "a/2", "b/1"):
        await replica_client.put_object(key, b"v")

    await replica_client.delete_objects(["a/1", "b/1", "never/existed"])
    await replica_client.delete_objects([])

    assert [o.key for o in await replica_client.list_objects()] == ["a/2"]
    with pytest.raises(ObjectNotFoundError):
        await replica_client.get_object("a/1")


async def test_delete_more_than_one_batch(replica_client: ReplicaClient) -> None:
    await replica_client.put_object("keep", b"")
    await replica_client.put_object("gone/0001", b"")

    await replica_client.delete_objects([f"gone/{i:04d}" for i in range(1001)])

    assert [o.key for o in await replica_client.list_objects()] == ["keep"]
    assert replica_client.stats.requests["DELETE"] == 2


async def test_create_only_refuses_existing_key(make_replica_client: ClientFactory) -> None:
    first = await make_replica_client()
    if not first.supports_create_only:
        pytest.skip("rclone serve s3 does not enforce If-None-Match, so create_only cannot fence")
    second = await make_replica_client()  # another writer on the same replica

    await first.put_object("lock", b"writer one", create_only=True)
    with pytest.raises(ObjectExistsError, match="lock"):
        await second.put_object("lock", b"writer two", create_only=True)

    assert await first.get_object("lock") == b"writer one"
    assert second.stats.errors == {"exists": 1}


@pytest.mark.parametrize("size", [1000, 6 * MIB + 1], ids=["single-put", "multipart"])
async def test_create_only_put_file_refuses_existing_key(
    make_replica_client: ClientFactory, tmp_path: Path, size: int
) -> None:
    first = await make_replica_client(part_size=MIN_PART_SIZE)
    if not first.supports_create_only:
        pytest.skip("rclone serve s3 does not enforce If-None-Match, so create_only cannot fence")
    second = await make_replica_client(part_size=MIN_PART_SIZE)
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    expected = write_random_file(mine, size)
    write_random_file(theirs, size)

    await first.put_file("segments/big", mine, create_only=True)
    await first.put_file("segments/big", mine, create_only=True)  # our own bytes: a retry
    with pytest.raises(ObjectExistsError, match="segments/big"):
        await second.put_file("segments/big", theirs, create_only=True)

    digest = hashlib.sha256()
    async for chunk in first.iter_object("segments/big"):
        digest.update(chunk)
    assert digest.hexdigest() == expected


async def test_stats_count_requests_and_bytes(replica_client: ReplicaClient) -> None:
    await replica_client.put_object("s", b"12345")
    await replica_client.get_object("s")
    await replica_client.list_objects()
    await replica_client.delete_objects(["s"])
    with pytest.raises(ObjectNotFoundError):
        await replica_client.get_object("s")

    stats = replica_client.stats
    assert stats.requests == {"PUT": 1, "GET": 2, "LIST": 1, "DELETE": 1}
    assert (stats.bytes_uploaded, stats.bytes_downloaded) == (5, 5)
    assert stats.errors == {"not_found": 1}


async def test_use_after_close_is_refused(replica_client: ReplicaClient) -> None:
    await replica_client.put_object("k", b"v")
    await replica_client.close()
    await replica_client.close()  # idempotent

    with pytest.raises(RuntimeError, match="closed"):
        await replica_client.list_objects()
    with pytest.raises(RuntimeError, match="closed"):
        await replica_client.put_object("k", b"v")
    with pytest.raises(RuntimeError, match="closed"):
        async for _ in replica_client.iter_object("k"):
            pass


async def test_url_names_the_replica_without_secrets(
    replica_client: ReplicaClient, backend: str, s3_server: S3Server | None, tmp_path: Path
) -> None:
    if backend == "memory":
        assert replica_client.url == "memory://replica"
    elif s3_server is None:
        assert replica_client.url == (tmp_path / "replica").as_uri()
    else:
        bucket = urlsplit(replica_client.url).netloc
        expected = f"s3://{bucket}/{S3_PREFIX}?endpoint={s3_server.endpoint_url}"
        assert replica_client.url == expected
        assert s3_server.secret_access_key not in replica_client.url


# -- backend-specific behaviour --------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["file"])
async def test_file_temp_files_are_never_listed(
    make_replica_client: ClientFactory, tmp_path: Path
) -> None:
    first = await make_replica_client()
    second = await make_replica_client()
    await first.put_object("dir/lock", b"one", create_only=True)
    (tmp_path / "replica" / "dir" / f"{TEMP_PREFIX}leftover").write_bytes(b"crashed writer")

    with pytest.raises(ObjectExistsError):
        await second.put_object("dir/lock", b"two", create_only=True)

    assert await first.list_objects() == [ObjectInfo("dir/lock", 3)]
    leftovers = sorted(p.name for p in (tmp_path / "replica" / "dir").iterdir())
    assert leftovers == [f"{TEMP_PREFIX}leftover", "lock"]  # the failed write cleaned up


@pytest.mark.parametrize("backend", ["file"])
async def test_file_rejects_keys_outside_the_root(replica_client: ReplicaClient) -> None:
    for key in ("../escape", "a//b", "/abs", "", f"x/{TEMP_PREFIX}y"):
        with pytest.raises(ValueError, match="key"):
            await replica_client.put_object(key, b"")


async def test_file_root_needs_an_existing_parent(tmp_path: Path) -> None:
    async with FileReplicaClient(tmp_path / "not-mounted" / "replica") as client:
        assert await client.list_objects() == []
        with pytest.raises(ReplicaAccessError, match="does not exist"):
            await client.put_object("k", b"v")


@pytest.mark.parametrize("backend", ["file"])
async def test_file_disk_full_is_unavailable_and_leaves_no_temp_file(
    replica_client: ReplicaClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await replica_client.put_object("segments/a", b"old")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(ReplicaUnavailableError, match="disk full"):
        await replica_client.put_object("segments/a", b"new")
    monkeypatch.undo()

    assert sorted(p.name for p in (tmp_path / "replica" / "segments").iterdir()) == ["a"]
    assert await replica_client.get_object("segments/a") == b"old"
    assert replica_client.stats.errors == {"unavailable": 1}


@pytest.mark.parametrize("backend", ["file"])
async def test_file_permission_denied_is_an_access_error(
    replica_client: ReplicaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await replica_client.put_object("segments/a", b"x")

    def denied(path: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", denied)  # running as root, chmod would not stop us
    with pytest.raises(ReplicaAccessError, match="Permission denied") as caught:
        await replica_client.list_objects()
    assert "permissions" in str(caught.value)  # the hint


@pytest.mark.parametrize("backend", ["rclone", "moto"])
async def test_s3_keys_live_under_the_prefix_only(
    make_replica_client: ClientFactory, s3_server: S3Server
) -> None:
    client = await make_replica_client()
    sibling = await make_replica_client(prefix=S3_PREFIX + "0")  # "replicas/db10"
    await client.put_object("segments/00/a", b"x")
    await sibling.put_object("segments/00/b", b"y")

    bucket = urlsplit(client.url).netloc
    async with raw_client(s3_server) as s3:
        listed = await s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed["Contents"]] == [
        f"{S3_PREFIX}/segments/00/a",
        f"{S3_PREFIX}0/segments/00/b",
    ]
    assert [o.key for o in await client.list_objects()] == ["segments/00/a"]
    await client.delete_objects(["segments/00/b"])  # the sibling's key, relative to our prefix
    assert [o.key for o in await sibling.list_objects()] == ["segments/00/b"]


@pytest.mark.parametrize("backend", ["rclone"])
async def test_rclone_ignores_if_none_match(make_replica_client: ClientFactory) -> None:
    """Documents why rclone runs with `conditional_writes=False`; fails if rclone starts fencing."""
    client = await make_replica_client(conditional_writes=True)
    await client.put_object("lock", b"one", create_only=True)
    await client.put_object("lock", b"two", create_only=True)

    assert await client.get_object("lock") == b"two"


@pytest.mark.parametrize("backend", ["rclone", "moto"])
async def test_failed_multipart_upload_is_aborted(
    make_replica_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_replica_client(part_size=MIN_PART_SIZE, concurrency=1)
    assert isinstance(client, S3ReplicaClient)
    source = tmp_path / "large.db"
    write_random_file(source, 11 * MIB)
    real_upload_part = client._upload_part

    async def fail_second_part(what: str, target: Any, number: int, *rest: Any) -> str:
        if number == 2:
            raise OSError("disk went away")
        return await real_upload_part(what, target, number, *rest)

    monkeypatch.setattr(client, "_upload_part", fail_second_part)
    with pytest.raises(OSError, match="disk went away"):
        await client.put_file("snapshots/big", source)

    assert client.stats.requests["ABORT_MULTIPART"] == 1
    assert "COMPLETE_MULTIPART" not in client.stats.requests
    assert await client.list_objects() == []
