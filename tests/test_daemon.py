"""`Daemon` in this process: start-up, ordered shutdown, flush, failures, exec mode.

The replicas are `MemoryReplicaClient`s, so every test can look at exactly what was shipped;
each waits on a condition (`on_ready`, the store's contents), never on a sleep.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
from structlog.testing import LogCapture
from structlog.typing import FilteringBoundLogger

from replicad.daemon import Daemon
from replicad.db import Database
from replicad.errors import ReplicadError, ReplicaUnavailableError, ShutdownError
from replicad.position import ObjectKind, parse_key
from replicad.replica import Replica
from replicad.replicator import DatabaseReplicator
from replicad.restore import restore
from replicad.testing import MemoryReplicaClient
from tests import workload
from tests.procs import wait_for_async

#: Long enough never to be reached in a passing test, short enough to end a failing one.
WAIT = 20.0


class _Unreachable(MemoryReplicaClient):
    """A replica that took the first snapshot and then became unreachable for every write."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def put_object(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        if self.down:
            raise ReplicaUnavailableError(f"{self.url}: connection refused")
        await super().put_object(key, data, create_only=create_only)


def _app(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    workload.setup(conn)
    return conn


def _daemon(
    tmp_path: Path,
    client: MemoryReplicaClient,
    *,
    shutdown_timeout: float = 10,
    log: FilteringBoundLogger | None = None,
    watch: bool = False,
    on_ready: Callable[[], None] | None = None,
    child: list[str] | None = None,
    standby: bool = True,
) -> Daemon:
    replicator = DatabaseReplicator(
        Database(tmp_path / "app.db"),
        [Replica("mem", client)],
        name="app",
        state_dir=tmp_path / "state",
        poll_interval=0.05,
        sync_interval=0,
        log=log,
    )
    return Daemon(
        [replicator],
        [client],
        shutdown_timeout=shutdown_timeout,
        watch=watch,
        on_ready=on_ready,
        child=child,
        standby=standby,
    )


async def _serving(
    tmp_path: Path, client: MemoryReplicaClient, *, shutdown_timeout: float = 10, watch: bool
) -> tuple[Daemon, asyncio.Task[int]]:
    """A daemon serving in a task of this loop, once it says it is ready."""
    ready = asyncio.Event()
    daemon = _daemon(
        tmp_path, client, shutdown_timeout=shutdown_timeout, watch=watch, on_ready=ready.set
    )
    serving = asyncio.create_task(daemon.serve())
    await asyncio.wait_for(ready.wait(), WAIT)
    return daemon, serving


def _shipped_txid(client: MemoryReplicaClient) -> int:
    names = [n for n in map(parse_key, client.objects) if n is not None]
    return max((n.last_txid for n in names), default=0)


async def _restored(tmp_path: Path, store: dict[str, bytes]) -> Path:
    out = tmp_path / "restored.db"
    async with MemoryReplicaClient(objects=store) as reader:
        await restore(reader, out)
    return out


async def test_stop_flushes_every_commit_and_closes_the_clients(tmp_path: Path) -> None:
    app = _app(tmp_path / "app.db")
    client = MemoryReplicaClient()
    daemon, serving = await _serving(tmp_path, client, watch=True)
    for k in range(1, 31):
        workload.apply_txn(app, 5, k)
    daemon.request_stop()  # at once: what the loops have not shipped yet, the flush must
    assert await asyncio.wait_for(serving, WAIT) == 0
    app.close()
    assert _shipped_txid(client) >= 31, "the snapshot, then 30 transactions"
    with pytest.raises(RuntimeError, match="closed"):
        await client.list_objects()
    out = await _restored(tmp_path, client.objects)
    assert workload.dump(out) == workload.dump(tmp_path / "app.db")


async def test_a_database_created_later_is_replicated_once_it_exists(tmp_path: Path) -> None:
    client = MemoryReplicaClient()
    ready = asyncio.Event()
    events = LogCapture()
    log = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[events],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    daemon = _daemon(tmp_path, client, watch=False, on_ready=ready.set, log=log)
    serving = asyncio.create_task(daemon.serve())

    def waiting() -> bool:
        return any(
            e["event"] == "database does not exist yet; waiting for it" for e in events.entries
        )

    await wait_for_async(waiting, WAIT, "the daemon to notice the database is missing")
    assert not ready.is_set()
    app = _app(tmp_path / "app.db")
    await asyncio.wait_for(ready.wait(), WAIT)
    await wait_for_async(lambda: _shipped_txid(client) >= 1, WAIT, "the first snapshot")
    daemon.request_stop()
    assert await asyncio.wait_for(serving, WAIT) == 0
    app.close()


async def test_stop_before_the_database_exists_is_a_clean_exit(tmp_path: Path) -> None:
    client = MemoryReplicaClient()
    daemon = _daemon(tmp_path, client, watch=False)
    serving = asyncio.create_task(daemon.serve())
    await asyncio.sleep(0)  # a turn of the loop: the daemon is serving, waiting for the file
    daemon.request_stop()
    assert await asyncio.wait_for(serving, WAIT) == 0
    assert client.objects == {}


async def test_a_signal_received_during_start_up_stops_it_cleanly(tmp_path: Path) -> None:
    _app(tmp_path / "app.db").close()
    client = MemoryReplicaClient()
    daemon = _daemon(tmp_path, client, watch=False)
    status = await asyncio.wait_for(daemon.serve(early_signals=[signal.SIGTERM]), WAIT)
    assert status == 0


async def test_unshippable_data_fails_the_shutdown_with_a_reason(tmp_path: Path) -> None:
    app = _app(tmp_path / "app.db")
    client = _Unreachable()
    daemon, serving = await _serving(tmp_path, client, shutdown_timeout=0.5, watch=False)
    await wait_for_async(lambda: _shipped_txid(client) >= 1, WAIT, "the first snapshot")
    client.down = True
    for k in range(1, 4):
        workload.apply_txn(app, 5, k)
    (replicator,) = daemon.replicators
    await wait_for_async(lambda: replicator.stats.transactions >= 3, WAIT, "the capture")
    daemon.request_stop()
    with pytest.raises(ShutdownError, match="not shipped") as info:
        await asyncio.wait_for(serving, WAIT)
    assert "still in the WAL" in (info.value.hint or "")
    with pytest.raises(RuntimeError, match="closed"):
        await client.list_objects()
    app.close()


async def test_a_second_daemon_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    """With --no-standby (a standby would wait for the first: tests/test_fencing.py)."""
    _app(tmp_path / "app.db").close()
    first, serving = await _serving(tmp_path, MemoryReplicaClient(), watch=False)
    second = _daemon(tmp_path, MemoryReplicaClient(), watch=False, standby=False)
    with pytest.raises(ReplicadError, match="already replicating"):
        await second.serve()
    first.request_stop()
    assert await asyncio.wait_for(serving, WAIT) == 0


async def test_requested_snapshots_are_taken(tmp_path: Path) -> None:
    app = _app(tmp_path / "app.db")
    client = MemoryReplicaClient()
    daemon, serving = await _serving(tmp_path, client, watch=False)

    def snapshots() -> int:
        names = [n for n in map(parse_key, client.objects) if n is not None]
        return sum(n.kind is ObjectKind.SNAPSHOT for n in names)

    await wait_for_async(lambda: snapshots() == 1, WAIT, "the first snapshot")
    workload.apply_txn(app, 5, 1)
    daemon.request_snapshots()  # what SIGUSR1 does
    await wait_for_async(lambda: snapshots() == 2, WAIT, "the requested snapshot")
    daemon.request_stop()
    assert await asyncio.wait_for(serving, WAIT) == 0
    app.close()


async def test_exec_mode_stops_when_the_application_exits(tmp_path: Path) -> None:
    """The application runs once replication is ready; its exit ends replication (flushed)."""
    _app(tmp_path / "app.db").close()
    script = (
        "import sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "conn.execute(\"INSERT INTO items(k, v) VALUES (1, 'from the app')\")\n"
        "sys.exit(3)\n"
    )
    client = MemoryReplicaClient()
    child = [sys.executable, "-c", script, str(tmp_path / "app.db")]
    daemon = _daemon(tmp_path, client, watch=True, child=child)
    assert await asyncio.wait_for(daemon.serve(), WAIT) == 0
    assert daemon.child_status == 3
    out = await _restored(tmp_path, client.objects)
    conn = sqlite3.connect(out)
    try:
        assert conn.execute("SELECT v FROM items WHERE k = 1").fetchone() == ("from the app",)
    finally:
        conn.close()
