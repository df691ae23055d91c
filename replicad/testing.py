"""Helpers for testing code that replicates with replicad, shipped in the package.

In the manner of ``structlog.testing``: small, real implementations rather than mocks.

* `MemoryReplicaClient` - a `ReplicaClient` holding its objects in a
  dict.  It keeps the protocol's whole contract (sorted listings with bounds, `create_only`,
  the error tree, counted requests, refusal after `close()`) and passes the same contract
  suite as the real backends.
* `ReplicatorHarness` - one SQLite database, its replicas and a `DatabaseReplicator` with every
  loop switched off: a test calls `step()` (capture, then upload on every replica) and decides
  exactly when each thing happens, instead of sleeping and hoping the loops got there.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import NoReturn

from replicad.clients.base import ClientStats, ObjectInfo, check_dir_prefix, keys_between
from replicad.clients.file import DELETE_BATCH, FileReplicaClient
from replicad.db import DEFAULT_SPILL_BYTES, Database
from replicad.errors import ObjectExistsError, ObjectNotFoundError, ReplicaError
from replicad.replica import Replica
from replicad.replicator import DatabaseReplicator
from replicad.restore import restore

#: Chunk size of `MemoryReplicaClient.iter_object` unless the caller asks for another.
DEFAULT_CHUNK_SIZE = 1 << 20


class MemoryReplicaClient:
    """A `ReplicaClient` keeping objects in memory; `objects` is the storage, key -> bytes.

    Clients given the same `objects` dict see one store, as two processes see one bucket.
    Also an async context manager; after `close()` every method raises `RuntimeError`.
    """

    def __init__(self, name: str = "replica", *, objects: dict[str, bytes] | None = None) -> None:
        self.objects: dict[str, bytes] = {} if objects is None else objects
        self._name = name
        self._stats = ClientStats()
        self._closed = False

    @property
    def stats(self) -> ClientStats:
        """Counters of requests and bytes, under the same operation names as S3."""
        return self._stats

    @property
    def url(self) -> str:
        """``memory://NAME``."""
        return f"memory://{self._name}"

    @property
    def supports_create_only(self) -> bool:
        """Always true: a dict can tell atomically whether a key exists."""
        return True

    async def open(self) -> None:
        """Nothing to connect; present so every backend is opened the same way."""
        self._check_open()

    async def close(self) -> None:
        """Refuse further use. Idempotent."""
        self._closed = True

    async def __aenter__(self) -> MemoryReplicaClient:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def list_objects(
        self, prefix: str = "", *, start_after: str | None = None, end_before: str | None = None
    ) -> list[ObjectInfo]:
        """Every object whose key starts with `prefix` strictly between the bounds, sorted."""
        self._check_open()
        self._stats.count("LIST")
        infos = [ObjectInfo(k, len(v)) for k, v in self.objects.items() if k.startswith(prefix)]
        return keys_between(infos, start_after, end_before)

    async def list_dirs(self, prefix: str = "") -> list[str]:
        """The names one level below `prefix` that lead to objects, sorted."""
        check_dir_prefix(prefix)
        self._check_open()
        self._stats.count("LIST")
        below = (k[len(prefix) :] for k in self.objects if k.startswith(prefix))
        return sorted({rest.split("/", 1)[0] for rest in below if "/" in rest})

    async def put_object(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        """Store `data` under `key`.

        With `create_only`, `ObjectExistsError` if `key` holds other bytes; the same bytes are
        success, as on S3: our own earlier try, not another writer.
        """
        self._check_open()
        self._stats.count("PUT", uploaded=len(data))
        if create_only and self.objects.get(key, data) != data:
            self._fail(
                ObjectExistsError(
                    f"object {key!r} already exists in {self.url}",
                    hint="another writer is using this replica",
                )
            )
        self.objects[key] = bytes(data)

    async def put_file(self, key: str, path: Path, *, create_only: bool = False) -> None:
        """Store the contents of a local file under `key` (read whole: memory is the storage)."""
        data = await asyncio.to_thread(path.read_bytes)
        await self.put_object(key, data, create_only=create_only)

    async def get_object(self, key: str) -> bytes:
        """The whole object; `ObjectNotFoundError` if it does not exist."""
        self._check_open()
        data = self.objects.get(key)
        self._stats.count("GET", downloaded=len(data or b""))
        if data is None:
            self._fail(ObjectNotFoundError(f"{self.url}: no object {key}"))
        return data

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of the object from offset `start` (fewer at its end)."""
        self._check_open()
        data = self.objects.get(key)
        piece = b"" if data is None else data[start : start + length]
        self._stats.count("GET", downloaded=len(piece))
        if data is None:
            self._fail(ObjectNotFoundError(f"{self.url}: no object {key}"))
        return piece

    async def iter_object(
        self, key: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        """The object in chunks of at most `chunk_size`; `ObjectNotFoundError` if missing."""
        data = await self.get_object(key)
        for start in range(0, len(data), chunk_size):
            yield data[start : start + chunk_size]

    async def delete_objects(self, keys: Sequence[str]) -> None:
        """Delete these keys; keys already absent are not an error.

        Counted as one `DELETE` per `DELETE_BATCH` keys, as S3's DeleteObjects, so costs compare.
        """
        self._check_open()
        for start in range(0, len(keys), DELETE_BATCH):
            self._stats.count("DELETE")
            for key in keys[start : start + DELETE_BATCH]:
                self.objects.pop(key, None)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.url}: the client is closed")

    def _fail(self, error: ReplicaError) -> NoReturn:
        self._stats.count_error(error)
        raise error


class ReplicatorHarness:
    """One database, one local-directory replica, and a replicator driven by explicit steps.

    `app()` opens the application's connection (WAL mode, autocheckpoint off unless asked);
    `start()` loads the replica and ships the first snapshot; each `step()` captures what was
    committed and uploads it; `restored()` restores the replica to a new file and checks it.
    """

    def __init__(self, tmp: Path, *, spill_bytes: int = DEFAULT_SPILL_BYTES) -> None:
        self.tmp = tmp
        #: Transactions above this are captured into a spool file (see replicad.spool).
        self.spill_bytes = spill_bytes
        self.db_path = tmp / "app.db"
        self.replica_dir = tmp / "replica"
        self.state_dir = tmp / "state"
        self.rep: DatabaseReplicator | None = None
        self._restores = 0

    def app(self, *, autocheckpoint: int = 0) -> sqlite3.Connection:
        """The application's connection, with table ``t(id, v, b)``."""
        conn = sqlite3.connect(self.db_path, isolation_level=None, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint}")
        conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
        return conn

    async def start(self) -> DatabaseReplicator:
        """Start the replicator (no loops) and upload what start-up queued."""
        replica = Replica("r", FileReplicaClient(self.replica_dir))
        database = Database(self.db_path, spill_dir=self.state_dir, spill_bytes=self.spill_bytes)
        self.rep = DatabaseReplicator(
            database, [replica], name="app", state_dir=self.state_dir, sync_interval=0
        )
        await self.rep.start()
        await replica.upload()
        return self.rep

    async def step(self) -> None:
        """One sync step, then an upload on every replica."""
        rep = self._running()
        await rep.sync_step()
        for replica in rep.replicas:
            await replica.upload()

    def stop(self) -> None:
        """Close the replicator (no flush: what is not uploaded stays unshipped)."""
        self._running().close()
        self.rep = None

    async def restored(self) -> Path:
        """Restore the replica's latest state to a new file; it must pass the integrity check."""
        self._restores += 1
        out = self.tmp / f"restored{self._restores}.db"
        await restore(FileReplicaClient(self.replica_dir), out)
        conn = sqlite3.connect(out)
        try:
            (result,) = conn.execute("PRAGMA integrity_check").fetchone()
        finally:
            conn.close()
        if result != "ok":
            raise AssertionError(f"{out}: integrity_check says {result}")
        return out

    def snapshots(self) -> int:
        """Snapshots in the replica now."""
        return len(list((self.replica_dir / "snapshots").glob("*.snap")))

    def _running(self) -> DatabaseReplicator:
        if self.rep is None:
            raise RuntimeError("the harness is not started (call start())")
        return self.rep
