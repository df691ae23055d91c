"""The daemon: one event loop, one TaskGroup, wake-ups from file events, ordered shutdown.

`Daemon.serve()` = `startup()` inside the TaskGroup, the loops, then `shutdown()`: on SIGTERM or
SIGINT the loops stop, every database gets a final sync and every replica a flush (retried until
the shutdown deadline), connections are released, and the exit status says whether everything
committed was shipped.  A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import structlog

from replicad.clients.base import ReplicaClient
from replicad.errors import DatabaseError, LeaseError, LeaseLostError, ReplicadError, ShutdownError
from replicad.lease import StandbyStopped
from replicad.observe import MetricsServer, liveness
from replicad.pidfile import DatabaseLock, StateLock
from replicad.replicator import DatabaseReplicator
from replicad.systemd import notify, watchdog_interval
from replicad.watch import watch

#: After a file event, how long the watcher lets further events merge before it reads again:
#: one wake-up (and sync) per database per pause under steady writes, so a commit is captured
#: (and time-stamped) within this much of being made, as with the 50 ms step watchfiles had.
WATCH_PAUSE = 0.05
EXIT_FORCED = 130
#: How often a standby tries the database's host lock: a successor starts within this much of
#: the holder's exit.
_LOCK_POLL = 0.1

log = structlog.get_logger()


class DaemonComponent(Protocol):
    """A task run beside the databases (e.g. directory mode adding and removing some)."""

    async def run(self, daemon: Daemon) -> None:
        """Run until `daemon.stop` is set."""


class Daemon:
    """Runs replicators until stopped, then flushes them."""

    def __init__(
        self,
        replicators: list[DatabaseReplicator],
        clients: list[ReplicaClient],
        *,
        shutdown_timeout: float,
        watch: bool = True,
        on_ready: Callable[[], None] | None = None,
        metrics: MetricsServer | None = None,
        child: Sequence[str] | None = None,
        child_env: Mapping[str, str] | None = None,
        standby: bool = True,
        components: Sequence[DaemonComponent] = (),
    ) -> None:
        self.replicators = replicators
        self.clients = clients
        self.shutdown_timeout = shutdown_timeout
        self.watch = watch
        self.on_ready = on_ready
        self.metrics = metrics
        #: `replicad exec`: the application command run as a child once replication is ready.
        self.child = list(child) if child else None
        #: The child's environment (None: ours); `replicad exec` scrubs its credentials out.
        self.child_env = dict(child_env) if child_env is not None else None
        self.child_status: int | None = None
        self._child_proc: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self.stop = asyncio.Event()
        self._signals = 0
        self._started: list[DatabaseReplicator] = []
        #: Wait while another daemon replicates a database (False: exit with an error).
        self.standby = standby
        self._locks: list[DatabaseLock | StateLock] = []
        #: Tasks that add or remove databases while the daemon runs (`add_database`).
        self.components = list(components)
        self._tg: asyncio.TaskGroup | None = None
        #: Per database added while running: its own stop, task and host locks.
        self._db_stops: dict[int, asyncio.Event] = {}
        self._db_tasks: dict[int, asyncio.Task[None]] = {}
        self._db_locks: dict[int, list[DatabaseLock | StateLock]] = {}

    async def serve(self, early_signals: Sequence[signal.Signals] = ()) -> int:
        """Replicate until a stop is requested; returns the process exit status.

        `early_signals`: SIGTERM/SIGINT that arrived while the process was still starting
        (`catch_early_signals`); they are acted on as soon as the daemon's handlers are in.
        """
        for replicator in self.replicators:
            _require_directory(replicator.db.path)
        try:
            return await self._serve(early_signals)
        finally:
            for lock in self._locks:
                lock.release()
            global _served  # noqa: PLW0603 - one flag per process, read by `replicad.launch`
            _served = True

    async def _serve(self, early_signals: Sequence[signal.Signals]) -> int:
        self._install_signals()
        for sig in early_signals[:1]:
            self._on_signal(sig)
        if self.metrics is not None:
            await self.metrics.start()
        failure: ReplicadError | None = None
        problems: list[str] = []
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for component in self.components:
                    tg.create_task(component.run(self))
                for replicator in self.replicators:
                    tg.create_task(self._run_database(replicator))
                if self.watch:
                    tg.create_task(self._watch())
                if (interval := watchdog_interval()) is not None:
                    tg.create_task(self._watchdog(interval))
                if self.child is not None:
                    tg.create_task(self._run_child(self.child))
        except* ReplicadError as group:
            failure = group.exceptions[0]  # type: ignore[assignment]
            log.error("stopping after a fatal error", error=str(failure))
        finally:
            # Also after a bug or a cancellation: flush what can be, release leases, close.
            problems = await self.shutdown()
        if failure is not None:
            raise failure
        if fenced := [r.fenced for d in self.replicators for r in d.replicas if r.fenced]:
            raise LeaseLostError(
                "; ".join(fenced + problems),
                hint="another daemon owns the replica now; what this one captured after the "
                "takeover was not shipped by it (the new owner ships the database's own state)",
            )
        if problems:
            raise ShutdownError(
                "stopped with data not shipped: " + "; ".join(problems),
                hint="the replica was unreachable; what was not shipped is still in the WAL and "
                "is shipped when replicad starts again, unless the WAL is checkpointed first",
            )
        return 0

    def request_stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM/SIGINT do)."""
        self.stop.set()
        for event in self._db_stops.values():
            event.set()
        for replicator in self.replicators:
            replicator.interrupt()

    def add_database(
        self, replicator: DatabaseReplicator, clients: Sequence[ReplicaClient]
    ) -> None:
        """Start replicating one more database while running (directory mode).

        Unlike a configured database, its failure to start is logged and leaves the others
        running: a tenant's broken file must not stop everyone's backups.
        """
        assert self._tg is not None, "add_database is for components, once serve() runs"
        self.replicators.append(replicator)
        self.clients.extend(clients)
        stop = asyncio.Event()
        if self.stop.is_set():
            stop.set()
        self._db_stops[id(replicator)] = stop
        self._db_tasks[id(replicator)] = self._tg.create_task(self._run_added(replicator, stop))

    async def remove_database(
        self,
        replicator: DatabaseReplicator,
        clients: Sequence[ReplicaClient],
        *,
        final_sync: bool = True,
    ) -> list[str]:
        """Stop one database added by `add_database`: its loops end, what it captured is
        flushed (within the shutdown timeout), and its connections, leases and locks are
        released.  Returns what could not be shipped.  `final_sync=False` when the file is
        gone: what was captured is uploaded, nothing more can be read.
        """
        key = id(replicator)
        self._db_stops.pop(key).set()
        replicator.interrupt()
        task = self._db_tasks.pop(key)
        if replicator not in self._started:
            task.cancel()  # still waiting for its lock or its file: nothing to flush
        with contextlib.suppress(asyncio.CancelledError):
            await task
        problems: list[str] = []
        if replicator in self._started:
            self._started.remove(replicator)
            try:
                problems = await replicator.flush(
                    time.monotonic() + self.shutdown_timeout, final_sync=final_sync
                )
            except ReplicadError as exc:
                problems = [f"{replicator.name}: {exc}"]
        try:
            await asyncio.to_thread(replicator.close)
        except DatabaseError as exc:  # pragma: no cover - close errors are only logged
            log.warning("closing database failed", db=replicator.name, error=str(exc))
        for replica in replicator.replicas:
            if replica.lease is not None and replica.fenced is None:
                await replica.lease.release()
        for lock in self._db_locks.pop(key, []):
            lock.release()
            self._locks.remove(lock)
        for client in clients:
            await client.close()
            self.clients.remove(client)
        self.replicators.remove(replicator)
        return problems

    async def _run_added(self, replicator: DatabaseReplicator, stop: asyncio.Event) -> None:
        try:
            await self._run_database(replicator, stop)
        except* ReplicadError as group:
            replicator.log.error(
                "this database stopped replicating", error=str(group.exceptions[0])
            )

    def check_ready(self) -> None:
        """Report readiness once every database known now has started (idempotent)."""
        if self._ready.is_set() or len(self._started) != len(self.replicators):
            return
        self._ready.set()
        notify(f"READY=1\nSTATUS=replicating {len(self._started)} database(s)")
        if self.on_ready is not None:
            self.on_ready()

    def _install_signals(self) -> None:
        """Our handlers (replacing `catch_early_signals`' ones)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGUSR1, self.request_snapshots)

    def request_snapshots(self) -> None:
        """Snapshot every database now (SIGUSR1, which `replicad snapshot` sends)."""
        log.info("snapshot requested")
        for replicator in self.replicators:
            replicator.request_snapshot()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._child_proc is not None and self._child_proc.returncode is None:
            # exec mode: the application decides when to stop; we flush once it has exited.
            log.info("forwarding signal to the application", signal=sig.name)
            self._child_proc.send_signal(sig)
            return
        self._signals += 1
        if self._signals > 1:
            log.error("second signal: exiting without finishing the flush", signal=sig.name)
            os._exit(EXIT_FORCED)
        log.info("stopping: flushing what was committed", signal=sig.name)
        self.request_stop()

    async def _run_database(
        self, replicator: DatabaseReplicator, stop: asyncio.Event | None = None
    ) -> None:
        stop = stop or self.stop
        if not await self._lock_database(replicator):
            return
        try:
            started = await self._start(replicator)
        except StandbyStopped:
            replicator.log.info("stopped while waiting as a standby; this daemon wrote nothing")
            return
        if not started:
            return
        self._started.append(replicator)
        self.check_ready()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(replicator.sync_loop(stop))
            for replica in replicator.replicas:
                tg.create_task(replicator.upload_loop(replica, stop))
                tg.create_task(replicator.maintenance_loop(replica, stop))
            for drill in replicator.drills:
                tg.create_task(drill.loop(stop))

    async def _lock_database(self, replicator: DatabaseReplicator) -> bool:
        """Take the database's host lock (pidfile.py), waiting as a standby while another
        process holds it (or for the database's directory to exist); False if a stop was
        requested first.
        """
        lock = DatabaseLock(replicator.db.path)
        directory = replicator.db.path.parent
        warned = False
        while True:
            if not directory.is_dir():
                if not warned:
                    replicator.log.warning("database directory does not exist yet; waiting for it")
                    warned = True
            elif await asyncio.to_thread(lock.try_acquire):
                break
            elif replicator.standby is None:
                self._standby(replicator, f"another replicad (pid {lock.holder()})")
            if await _stopped_within(self.stop, _LOCK_POLL):
                if replicator.standby is not None:
                    replicator.log.info("stopped while waiting as a standby; wrote nothing")
                return False
        if replicator.standby is not None:
            replicator.log.info("the other daemon is gone; taking over this database")
            replicator.standby = None
        state_lock = StateLock(replicator.state_dir, str(replicator.db.path))
        self._locks.extend((lock, state_lock))
        self._db_locks[id(replicator)] = [lock, state_lock]
        return True

    def _standby(self, replicator: DatabaseReplicator, holder: str) -> None:
        """Another process replicates this database: wait for it, or refuse (--no-standby)."""
        if not self.standby:
            raise LeaseError(
                f"{holder} is already replicating {replicator.db.path}",
                hint="stop it first, or start this one without --no-standby to wait for it; "
                "two daemons must never write the same replica",
            )
        replicator.standby = f"standby: waiting for {holder}"
        replicator.log.warning(f"waiting as a standby for {holder}")

    async def _start(self, replicator: DatabaseReplicator) -> bool:
        """Start one database; while its file does not exist yet, wait for it.

        A stop requested meanwhile still starts a database that exists: what was committed
        while no daemon ran is shipped by the flush that follows.
        """
        warned = False
        while True:
            if replicator.db.path.exists():
                await replicator.start()
                return True
            if self.stop.is_set():
                return False
            if not warned:
                replicator.log.warning("database does not exist yet; waiting for it")
                warned = True
            await _stopped_within(self.stop, replicator.poll_interval)

    async def _watch(self) -> None:
        """Wake a database's sync loop when its file or WAL changes (polling is the backstop)."""
        targets: dict[Path, Callable[[Path], None]] = {}
        for r in self.replicators:
            targets[r.db.path.absolute()] = r.file_changed
            targets[r.db.wal_path.absolute()] = r.file_changed
            r.watched = True
        try:
            await watch(targets, self.stop, pause=WATCH_PAUSE)
        finally:
            for r in self.replicators:
                r.watched = False

    async def _run_child(self, command: list[str]) -> None:
        """Start the application once replication is ready; stop replicating when it exits."""
        await self._ready.wait()
        try:
            self._child_proc = await asyncio.create_subprocess_exec(*command, env=self.child_env)
        except OSError as exc:
            self.child_status = 127
            log.error("cannot start the application", command=command[0], error=str(exc))
            self.request_stop()
            return
        log.info("application started", pid=self._child_proc.pid, command=command[0])
        self.child_status = await self._child_proc.wait()
        log.info("application exited; flushing", status=self.child_status)
        self.request_stop()

    async def _release_leases(self) -> None:
        for replicator in self.replicators:  # started or not: a standby may hold some leases
            for replica in replicator.replicas:
                if replica.lease is not None and replica.fenced is None:
                    await replica.lease.release()

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog while the sync loops are alive; a stuck loop stops the pings.

        systemd enforces the watchdog once the service is ready, so pings start then.
        """
        await self._ready.wait()
        while not self.stop.is_set():
            if not liveness(self._started):
                notify("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), interval)

    async def shutdown(self) -> list[str]:
        """Final sync and flush of every started database, then release everything."""
        notify("STOPPING=1")
        self.request_stop()
        deadline = time.monotonic() + self.shutdown_timeout
        results = await asyncio.gather(
            *(r.flush(deadline) for r in self._started), return_exceptions=True
        )
        problems: list[str] = []
        for replicator, result in zip(self._started, results, strict=True):
            if isinstance(result, BaseException):
                problems.append(f"{replicator.name}: {result}")
            else:
                problems.extend(result)
        for replicator in self.replicators:
            try:
                await asyncio.to_thread(replicator.close)
            except DatabaseError as exc:  # pragma: no cover - close errors are only logged
                log.warning("closing database failed", db=replicator.name, error=str(exc))
        await self._release_leases()
        for client in self.clients:
            await client.close()
        if self.metrics is not None:
            await self.metrics.stop()
        if not problems:
            log.info("stopped: everything committed was shipped")
        return problems


#: Set once a daemon has finished serving: everything it wrote is flushed and closed.
_served = False


def served() -> bool:
    """True once a `Daemon.serve()` in this process has returned (or raised)."""
    return _served


def _require_directory(db_path: Path) -> None:
    """Refuse a database whose directory does not exist, before anything is created there.

    A missing database file is waited for, but a missing directory is a typo or an unmounted
    volume: creating the state directory beside the database would make the path up.
    """
    if not db_path.parent.is_dir():
        raise DatabaseError(
            f"the directory of {db_path} does not exist",
            hint="check the database path; replicad waits for a missing database file, but never "
            "creates its directory (mount the volume or create it first)",
        )


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True as soon as `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


def catch_early_signals(
    received: list[signal.Signals] | None = None,
) -> list[signal.Signals]:
    """Record SIGTERM/SIGINT from now until `Daemon.serve` installs its handlers.

    Start-up (connecting to storage, importing) takes a moment; a stop requested meanwhile
    must still end in a clean exit, not in death by the signal's default action.  `received`:
    what `replicad.launch` recorded before the event loop ran; appended to and returned.
    """
    received = [] if received is None else received
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, received.append, sig)
    return received
