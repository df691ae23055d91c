"""The ReplicaClient protocol: the one narrow interface every storage backend implements.

Keys are relative to the replica's root (a directory, or a bucket prefix) and use `/` as the
separator.  Backends translate their own failures into the `replicad.errors` tree at this
boundary, so replication logic never sees botocore or OS error types:

* `ObjectNotFoundError` - the key does not exist;
* `ObjectExistsError` - a `create_only` write found the key already present;
* `ReplicaAccessError` - permanent (credentials, permissions, no such bucket/directory);
* `ReplicaUnavailableError` - transient (network, 5xx, throttling, timeout): retry later.

Every write is atomic: a reader sees the whole object or nothing.  Error messages name the
replica by `url`, which never includes credentials.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from replicad.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    ReplicaAccessError,
    ReplicaError,
)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object in a listing: its key relative to the replica root and its size in bytes."""

    key: str
    size: int


@dataclass
class ClientStats:
    """Requests and bytes a client has sent, by operation; read by the metrics layer.

    Operation names are the storage's own verbs in upper case: `PUT`, `GET`, `LIST`, `DELETE`,
    `HEAD`, `CREATE_MULTIPART`, `UPLOAD_PART`, `COMPLETE_MULTIPART`, `ABORT_MULTIPART`.  The file
    backend counts its equivalents under the same names so cost can be compared.
    """

    requests: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0

    def count(self, operation: str, *, uploaded: int = 0, downloaded: int = 0) -> None:
        """Record one request of `operation` and the payload bytes it moved."""
        self.requests[operation] = self.requests.get(operation, 0) + 1
        self.bytes_uploaded += uploaded
        self.bytes_downloaded += downloaded

    def count_error(self, error: ReplicaError) -> None:
        """Record one failed call, by kind: `not_found`, `exists`, `access` or `unavailable`."""
        kind = _ERROR_KINDS.get(type(error), "unavailable")
        self.errors[kind] = self.errors.get(kind, 0) + 1


_ERROR_KINDS: dict[type[ReplicaError], str] = {
    ObjectNotFoundError: "not_found",
    ObjectExistsError: "exists",
    ReplicaAccessError: "access",
}
#: Every kind `ClientStats.count_error` records.
ERROR_KINDS = (*_ERROR_KINDS.values(), "unavailable")


class ReplicaClient(Protocol):
    """Storage for one replica. Implementations: `FileReplicaClient`, `S3ReplicaClient`."""

    @property
    def stats(self) -> ClientStats:
        """Counters of requests and bytes, updated by every call."""
        ...

    @property
    def url(self) -> str:
        """Where this replica lives, for logs and messages; never contains a secret."""
        ...

    async def list_objects(
        self, prefix: str = "", *, start_after: str | None = None, end_before: str | None = None
    ) -> list[ObjectInfo]:
        """Every object whose key starts with `prefix`, sorted by key.

        `start_after` and `end_before` keep only keys strictly between them.  They cost nothing
        to skip: S3 starts the listing after `start_after` (`StartAfter`) and paging stops at
        the first page that reaches `end_before`, so a restore can list the few keys after a
        TXID among thousands.  A replica root that does not exist yet lists as empty (a replica
        is created by its first write). Raises `ReplicaAccessError` or `ReplicaUnavailableError`.
        """
        ...

    async def list_dirs(self, prefix: str = "") -> list[str]:
        """The names one level below `prefix` ("" or ending in "/") that lead to objects, sorted.

        S3's common prefixes for the delimiter "/": `list_dirs("segments/")` gives the
        compaction levels present, such as `["00", "01"]`, without listing their objects.  A
        directory backend may also name a directory whose objects are all deleted.
        """
        ...

    async def put_object(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        """Store `data` under `key` atomically, replacing any object there.

        With `create_only`, refuse with `ObjectExistsError` if the key exists (where the backend
        can tell atomically; see `supports_create_only`).
        """
        ...

    async def put_file(self, key: str, path: Path, *, create_only: bool = False) -> None:
        """Store the contents of a local file under `key`, streaming in bounded memory.

        `create_only` as for `put_object`.
        """
        ...

    async def get_object(self, key: str) -> bytes:
        """The whole object. Raises `ObjectNotFoundError` if it does not exist."""
        ...

    async def get_range(self, key: str, start: int, length: int) -> bytes | bytearray:
        """`length` bytes of the object from offset `start` (fewer at its end): one ranged GET,
        so a large object can be fetched as parts over several connections at once.

        Raises `ObjectNotFoundError` if it does not exist.
        """
        ...

    def iter_object(self, key: str, *, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The object's bytes as chunks of at most `chunk_size`, in bounded memory.

        Raises `ObjectNotFoundError` (on first iteration) if it does not exist.
        """
        ...

    async def delete_objects(self, keys: Sequence[str]) -> None:
        """Delete these keys; keys already absent are not an error."""
        ...

    @property
    def supports_create_only(self) -> bool:
        """Whether `create_only` is enforced atomically by the storage (fencing)."""
        ...

    async def close(self) -> None:
        """Release connections. The client cannot be used afterwards."""
        ...


def keys_between(
    objects: list[ObjectInfo], start_after: str | None, end_before: str | None
) -> list[ObjectInfo]:
    """`objects` sorted by key, keeping keys strictly between the bounds of `list_objects`.

    Backends filter on both bounds themselves: a server may ignore `StartAfter`, and the last
    page read returns keys past `end_before`.
    """
    return sorted(
        (
            info
            for info in objects
            if (start_after is None or info.key > start_after)
            and (end_before is None or info.key < end_before)
        ),
        key=lambda info: info.key,
    )


def check_dir_prefix(prefix: str) -> None:
    """`list_dirs` takes the root ("") or a prefix ending in "/"; ValueError otherwise."""
    if prefix and not prefix.endswith("/"):
        raise ValueError(f"list_dirs needs a prefix ending in '/', not {prefix!r}")
