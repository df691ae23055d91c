"""A replica in a local directory (or a mounted network filesystem).

Every write goes to a temporary file in the destination directory, is fsynced, and is then
renamed into place, after which the directory itself is fsynced, so a crash leaves either the
old object or the new one, never a torn one.  A `create_only` write links the temporary file to
the final name instead of renaming it: `link(2)` fails with `EEXIST` rather than replacing, so
fencing is atomic here too.  Temporary files start with `TEMP_PREFIX` and are never listed.

Blocking file I/O runs in worker threads (`asyncio.to_thread`) so the event loop keeps serving
other replicas; streaming reads and copies move at most `CHUNK_SIZE` bytes per step.

The replica root itself is created by the first write, but its parent must exist: a missing
parent usually means an unmounted volume, and filling the root filesystem instead would be
worse than failing loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from replicad.clients.base import ClientStats, ObjectInfo, check_dir_prefix, keys_between
from replicad.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    ReplicaAccessError,
    ReplicaError,
    ReplicaUnavailableError,
)
from replicad.private import DIR_MODE, create_private

#: Name prefix of in-flight temporary files; keys may not use it, listings skip it.
TEMP_PREFIX = ".tmp-"
#: Bytes copied per step when streaming a file in or out (bounds memory per call).
CHUNK_SIZE = 1 << 20
#: Keys deleted per counted `DELETE`, matching S3's DeleteObjects batch so costs compare.
DELETE_BATCH = 1000

_T = TypeVar("_T")

# Errors retrying cannot fix: permissions, read-only mounts, a file where a directory should be.
_PERMANENT_ERRNOS = frozenset(
    {
        errno.EEXIST,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)
_MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR})


class FileReplicaClient:
    """A `ReplicaClient` storing each object as a file under `root`.

    Also an async context manager; after `close()` every method raises `RuntimeError`.
    """

    def __init__(self, root: Path) -> None:
        self._root = root.absolute()
        self._stats = ClientStats()
        self._closed = False

    @property
    def stats(self) -> ClientStats:
        """Counters of requests and bytes, under the same operation names as S3."""
        return self._stats

    @property
    def url(self) -> str:
        """`file:///absolute/path` of the replica root."""
        return self._root.as_uri()

    @property
    def supports_create_only(self) -> bool:
        """Always true: `create_only` uses `link(2)`, which never replaces."""
        return True

    async def open(self) -> None:
        """Nothing to connect; present so both backends are opened the same way."""
        self._check_open()

    async def close(self) -> None:
        """Refuse further use. Idempotent."""
        self._closed = True

    async def __aenter__(self) -> FileReplicaClient:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def list_objects(
        self, prefix: str = "", *, start_after: str | None = None, end_before: str | None = None
    ) -> list[ObjectInfo]:
        """Every object whose key starts with `prefix` strictly between the bounds, sorted; a
        missing root lists as empty.
        """
        self._check_open()
        self._stats.count("LIST")
        objects = await self._run(
            f"LIST {prefix!r}", self._scan, prefix, start_after or "", end_before
        )
        return keys_between(objects, start_after, end_before)

    async def list_dirs(self, prefix: str = "") -> list[str]:
        """The directories in the one `prefix` names; a missing one lists as empty."""
        self._check_open()
        check_dir_prefix(prefix)
        directory = self._path(prefix[:-1]) if prefix else self._root
        self._stats.count("LIST")
        return await self._run(f"LIST {prefix!r}", _subdirectories, directory)

    async def put_object(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        """Write `data` atomically; with `create_only`, `ObjectExistsError` if `key` exists."""
        self._check_open()
        path = self._path(key)
        self._stats.count("PUT", uploaded=len(data))
        await self._run(f"PUT {key!r}", self._write_atomic, path, key, data, create_only)

    async def put_file(self, key: str, path: Path, *, create_only: bool = False) -> None:
        """Copy a local file in atomically, `CHUNK_SIZE` bytes at a time (`create_only` as for
        `put_object`).

        Raises `OSError` untranslated if `path` itself cannot be opened: that is a local
        problem, not the replica's.
        """
        self._check_open()
        target = self._path(key)
        source = await asyncio.to_thread(path.open, "rb")
        try:
            self._stats.count("PUT")
            size = await self._run(
                f"PUT {key!r}", self._write_atomic, target, key, source, create_only
            )
        finally:
            await asyncio.to_thread(source.close)
        self._stats.bytes_uploaded += size

    async def get_object(self, key: str) -> bytes:
        """The whole object; `ObjectNotFoundError` if it does not exist."""
        self._check_open()
        path = self._path(key)
        self._stats.count("GET")
        data = await self._run(f"GET {key!r}", path.read_bytes, missing=key)
        self._stats.bytes_downloaded += len(data)
        return data

    async def get_range(self, key: str, start: int, length: int) -> bytes | bytearray:
        """`length` bytes of the object from offset `start` (fewer at its end)."""
        self._check_open()
        path = self._path(key)
        self._stats.count("GET")
        data = await self._run(f"GET {key!r}", _read_range, path, start, length, missing=key)
        self._stats.bytes_downloaded += len(data)
        return data

    async def iter_object(self, key: str, *, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
        """The object in chunks of at most `chunk_size` bytes, read in a worker thread."""
        self._check_open()
        path = self._path(key)
        self._stats.count("GET")
        stream: IO[bytes] = await self._run(f"GET {key!r}", path.open, "rb", missing=key)
        try:
            while chunk := await self._run(f"GET {key!r}", stream.read, chunk_size):
                self._stats.bytes_downloaded += len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(stream.close)

    async def delete_objects(self, keys: Sequence[str]) -> None:
        """Remove these keys; absent keys are fine. Directories are left in place."""
        self._check_open()
        paths = [self._path(key) for key in keys]
        for start in range(0, len(paths), DELETE_BATCH):
            batch = paths[start : start + DELETE_BATCH]
            self._stats.count("DELETE")
            await self._run(f"DELETE of {len(batch)} keys", self._unlink_all, batch)

    # -- helpers running in worker threads -------------------------------------------------------

    def _scan(self, prefix: str, start_after: str, end_before: str | None) -> list[ObjectInfo]:
        """Walk only the directories that can hold keys starting with `prefix`; stat only the
        files between the bounds (a bounded listing of a large directory stays cheap).
        """
        start_dir = prefix.rpartition("/")[0]
        found: list[ObjectInfo] = []
        pending = [start_dir]
        while pending:
            rel_dir = pending.pop()
            try:
                entries = list(os.scandir(self._root / rel_dir))
            except FileNotFoundError:
                continue
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.name.startswith(TEMP_PREFIX):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if rel.startswith(prefix) or prefix.startswith(rel + "/"):
                        pending.append(rel)
                elif (
                    rel.startswith(prefix)
                    and rel > start_after
                    and (end_before is None or rel < end_before)
                    and entry.is_file(follow_symlinks=False)
                ):
                    with contextlib.suppress(FileNotFoundError):  # deleted while listing
                        found.append(ObjectInfo(rel, entry.stat(follow_symlinks=False).st_size))
        return found

    def _write_atomic(
        self, path: Path, key: str, source: bytes | IO[bytes], create_only: bool
    ) -> int:
        """Write `source` (bytes, or an open file to copy) to `path` via a temporary file."""
        self._make_dirs(path.parent)
        temp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            with create_private(temp) as out:
                size = out.write(source) if isinstance(source, bytes) else _copy(source, out)
                out.flush()
                os.fsync(out.fileno())
            if create_only:
                _link_no_replace(temp, path, key, self.url)
                temp.unlink()
            else:
                temp.replace(path)
            _fsync_dir(path.parent)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return size

    def _make_dirs(self, directory: Path) -> None:
        """Create `directory` and missing parents up to the root, fsyncing each new entry."""
        missing: list[Path] = []
        while not directory.is_dir():
            if directory == self._root.parent:
                raise ReplicaAccessError(
                    f"cannot create replica {self.url}: {directory} does not exist",
                    hint="create the parent directory (or mount the volume) first",
                )
            missing.append(directory)
            directory = directory.parent
        for new_dir in reversed(missing):
            try:
                new_dir.mkdir(mode=DIR_MODE)
            except FileExistsError:
                if not new_dir.is_dir():
                    raise
            _fsync_dir(new_dir.parent)

    def _unlink_all(self, paths: Sequence[Path]) -> None:
        """Unlink each path, then fsync each directory touched once."""
        touched: set[Path] = set()
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            touched.add(path.parent)
        for directory in touched:
            _fsync_dir(directory)

    # -- boundary ------------------------------------------------------------------------------

    async def _run(
        self, what: str, func: Callable[..., _T], *args: Any, missing: str | None = None
    ) -> _T:
        """Run blocking `func` in a thread, translating `OSError` into the replicad tree.

        `what` names the operation for messages; `missing` is the key whose absence an
        `ENOENT` means (reads only: for writes a vanished directory is not "not found").
        """
        try:
            return await asyncio.to_thread(func, *args)
        except OSError as exc:
            error = self._translate(exc, what, missing)
            error.operation = what.split(" ", 1)[0]
            self._stats.count_error(error)
            raise error from exc
        except ReplicaError as exc:
            self._stats.count_error(exc)
            raise

    def _translate(self, exc: OSError, what: str, missing: str | None) -> ReplicaError:
        failed = f"{what} in {self.url} failed"
        if missing is not None and exc.errno in _MISSING_ERRNOS:
            return ObjectNotFoundError(f"no object {missing!r} in {self.url}")
        if exc.errno in _PERMANENT_ERRNOS:
            return ReplicaAccessError(
                f"{failed}: {exc.strerror}",
                hint="check the directory's permissions and that it is mounted read-write",
            )
        if exc.errno == errno.ENOSPC:
            return ReplicaUnavailableError(f"{failed}: disk full", hint="free some space")
        if exc.errno == errno.EDQUOT:
            return ReplicaUnavailableError(f"{failed}: disk quota exceeded")
        return ReplicaUnavailableError(f"{failed}: {exc.strerror or exc}")

    def _path(self, key: str) -> Path:
        """The file for `key`; refuse keys that could escape the root or look temporary."""
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") or "\0" in p for p in parts):
            raise ValueError(f"invalid object key {key!r}")
        if parts[-1].startswith(TEMP_PREFIX):
            raise ValueError(f"object key {key!r} uses the reserved prefix {TEMP_PREFIX!r}")
        return self._root.joinpath(*parts)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"replica client for {self.url} is closed")


def _subdirectories(directory: Path) -> list[str]:
    """Names of the directories in `directory`, sorted; none if it does not exist."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    return sorted(
        e.name
        for e in entries
        if e.is_dir(follow_symlinks=False) and not e.name.startswith(TEMP_PREFIX)
    )


def _copy(source: IO[bytes], out: IO[bytes]) -> int:
    """Copy `source` into `out` in `CHUNK_SIZE` pieces; the number of bytes copied."""
    size = 0
    while chunk := source.read(CHUNK_SIZE):
        out.write(chunk)
        size += len(chunk)
    return size


def _link_no_replace(temp: Path, path: Path, key: str, url: str) -> None:
    """Give `temp` the name `path` unless something already has it.

    A key already holding exactly these bytes is success, as on S3: it is our own earlier
    try (a retry after a cancelled or interrupted step), not another writer.
    """
    try:
        os.link(temp, path)
    except FileExistsError as exc:
        if _same_content(temp, path):
            return
        raise ObjectExistsError(
            f"object {key!r} already exists in {url}",
            hint="another writer is using this replica",
        ) from exc


def _same_content(a: Path, b: Path) -> bool:
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
        with a.open("rb") as fa, b.open("rb") as fb:
            while chunk := fa.read(CHUNK_SIZE):
                if chunk != fb.read(len(chunk)):
                    return False
    except FileNotFoundError:
        return False
    return True


def _fsync_dir(directory: Path) -> None:
    """Make a directory's entries (new, renamed or removed names) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_range(path: Path, start: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(start)
        return f.read(length)
