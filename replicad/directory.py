"""Directory mode: every matching SQLite database in a directory, added and removed live.

`DirectoryWatcher` is a daemon component (daemon.DaemonComponent).  It scans its directories
at start, then on file events (watchfiles) with a slow poll as the backstop, and tells the
daemon to add a database when a WAL-mode SQLite file appears and to remove it (flushed) when
it disappears or is replaced by another file.  A file that is not a WAL-mode SQLite database
is skipped with one log line and looked at again only when it changes, so a stray file costs
neither an error loop nor a line per scan.

Wake-ups for these databases come from this component's watch as well (a change to `X-wal`
wakes X's sync loop): the daemon's own watch covers only the configured databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import watchfiles

from replicad.clients.base import ReplicaClient
from replicad.config import DatabaseConfig, DirectoryConfig
from replicad.errors import ReplicadError

if TYPE_CHECKING:
    from replicad.daemon import Daemon
    from replicad.replicator import DatabaseReplicator

#: The poll that catches what file events missed (an NFS mount, an overflowed inotify queue):
#: events bring a new database in well within a second; the poll within this.
RESCAN_SECONDS = 5.0
#: Batch events like the daemon's own watch does (see daemon.WATCH_DEBOUNCE_MS).
_DEBOUNCE_MS = 50
_STEP_MS = 50
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SIDE_FILES = ("-wal", "-shm", "-journal")

log = structlog.get_logger()

_Stamp = tuple[int, int, int]
#: Builds the replicator of one database and the clients it opened (cli.py supplies it).
ReplicatorFactory = Callable[
    [DatabaseConfig], Awaitable[tuple["DatabaseReplicator", list[ReplicaClient]]]
]


def classify(path: Path) -> str | None:
    """Why `path` cannot be replicated, or None if it is a WAL-mode SQLite database.

    "" means not yet: an empty file is a database being created, looked at again when it
    changes.
    """
    try:
        with path.open("rb") as f:
            header = f.read(20)
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if not header:
        return ""
    if not header.startswith(_SQLITE_MAGIC) or len(header) < 20:
        return "is not a SQLite database"
    if header[18] != 2 or header[19] != 2:
        return (
            "is a SQLite database in rollback-journal mode, not WAL mode (run "
            "`PRAGMA journal_mode=WAL;` on it once to have it replicated)"
        )
    return None


@dataclass(slots=True)
class _Running:
    """A database this component added: what identifies its file, and what to remove."""

    inode: int
    replicator: DatabaseReplicator
    clients: list[ReplicaClient]


class DirectoryWatcher:
    """Keeps the daemon's set of databases equal to the matching files of `directories`."""

    def __init__(self, directories: Sequence[DirectoryConfig], factory: ReplicatorFactory) -> None:
        self.directories = list(directories)
        self.factory = factory
        self.running: dict[Path, _Running] = {}
        #: Files skipped, with the (inode, size, mtime) they were skipped at: looked at again
        #: only when that changes, and logged once.
        self._skipped: dict[Path, _Stamp] = {}
        self._changed = asyncio.Event()
        #: A `-wal` path -> the replicator its changes wake.
        self._wal_targets: dict[Path, DatabaseReplicator] = {}

    async def run(self, daemon: Daemon) -> None:
        """Scan, add and remove until the daemon stops (then the daemon flushes the rest)."""
        await self.scan(daemon, first=True)
        daemon.check_ready()
        watch = asyncio.create_task(self._watch(daemon.stop))
        try:
            while not daemon.stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), RESCAN_SECONDS)
                self._changed.clear()
                if daemon.stop.is_set():
                    break
                await self.scan(daemon)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def scan(self, daemon: Daemon, *, first: bool = False) -> None:
        """Bring the daemon's databases in line with the files there now."""
        found = await asyncio.to_thread(_scan, self.directories)
        if first:
            for directory in self.directories:
                if not any(d is directory for d, _stamp in found.values()):
                    log.warning(
                        "no database in this directory matches the pattern (yet); new ones "
                        "are picked up as they appear",
                        directory=str(directory.path),
                        pattern=directory.pattern,
                    )
        for path in list(self.running):
            if path not in found:
                await self._remove(daemon, path, "removed")
            elif found[path][1][0] != self.running[path].inode:
                await self._remove(daemon, path, "replaced")
        for path in list(self._skipped):
            if path not in found:
                del self._skipped[path]
        for path, (directory, stamp) in sorted(found.items()):
            if path not in self.running and not daemon.stop.is_set():
                await self._consider(daemon, path, directory, stamp)

    async def _consider(
        self, daemon: Daemon, path: Path, directory: DirectoryConfig, stamp: _Stamp
    ) -> None:
        if self._skipped.get(path) == stamp:
            return
        why = await asyncio.to_thread(classify, path)
        if why is not None:
            if why:
                log.warning("skipping a file that cannot be replicated", path=str(path), why=why)
            self._skipped[path] = stamp
            return
        self._skipped.pop(path, None)
        db_config = directory.database(path)
        await asyncio.to_thread(_make_file_replica_parents, directory, db_config)
        try:
            replicator, clients = await self.factory(db_config)
        except ReplicadError as exc:
            log.error("cannot replicate this database", path=str(path), error=exc.message)
            self._skipped[path] = stamp
            return
        self.running[path] = _Running(stamp[0], replicator, clients)
        self._wal_targets[replicator.db.wal_path.absolute()] = replicator
        self._wal_targets[path] = replicator
        replicator.log.info("database found in a watched directory: replicating it")
        daemon.add_database(replicator, clients)

    async def _remove(self, daemon: Daemon, path: Path, why: str) -> None:
        entry = self.running.pop(path)
        replicator = entry.replicator
        self._wal_targets.pop(replicator.db.wal_path.absolute(), None)
        self._wal_targets.pop(path, None)
        # The file at `path` is gone or another one: the old one can no longer be read.
        problems = await daemon.remove_database(replicator, entry.clients, final_sync=False)
        if problems:
            replicator.log.warning(
                f"database {why}: released, with data not shipped", problems=problems
            )
        else:
            replicator.log.info(f"database {why}: flushed and released")

    async def _watch(self, stop: asyncio.Event) -> None:
        """File events: a `-wal` or database change wakes its sync loop; a database file
        created or deleted triggers a scan.
        """
        roots = {str(d.path): d.recursive for d in self.directories}
        recursive = any(roots.values())

        def wanted(_change: watchfiles.Change, path: str) -> bool:
            return not path.endswith(("-shm", "-journal", ".replicad-lock"))

        async for changes in watchfiles.awatch(
            *roots,
            stop_event=stop,
            debounce=_DEBOUNCE_MS,
            step=_STEP_MS,
            watch_filter=wanted,
            recursive=recursive,
        ):
            rescan = False
            for change, raw in changes:
                path = Path(raw)
                target = self._wal_targets.get(path)
                if target is not None:
                    target.wake.set()
                if change != watchfiles.Change.modified or (
                    target is None and not path.name.endswith(_SIDE_FILES)
                ):
                    rescan = True
            if rescan:
                self._changed.set()


def matching_files(directories: Sequence[DirectoryConfig]) -> dict[Path, DirectoryConfig]:
    """Every file matching a directory's pattern now, with its directory."""
    found: dict[Path, DirectoryConfig] = {}
    for directory in directories:
        for path in _walk(directory.path, recursive=directory.recursive):
            if directory.matches(path):
                found.setdefault(path, directory)
    return found


def _walk(root: Path, *, recursive: bool) -> list[Path]:
    """Regular files under `root` (not in hidden directories: our state lives there)."""
    found = []
    stack = [root]
    while stack:
        here = stack.pop()
        try:
            entries = list(os.scandir(here))
        except OSError:
            continue  # vanished or unreadable subdirectory: the next scan tries again
        for entry in entries:
            if entry.name.startswith("."):
                continue
            with contextlib.suppress(OSError):
                if entry.is_file():
                    found.append(Path(entry.path))
                elif recursive and entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
    return found


def _make_file_replica_parents(directory: DirectoryConfig, db_config: DatabaseConfig) -> None:
    """Create `<root>/<subdirectories>` for a database's file replicas when `<root>` exists:
    the configured root is the operator's (a missing one stays an error, as for a database),
    the levels below it mirror the watched directory and are ours to make.
    """
    for template, replica in zip(directory.template.replicas, db_config.replicas, strict=True):
        if template.path is not None and replica.path is not None and template.path.is_dir():
            replica.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def _scan(directories: Sequence[DirectoryConfig]) -> dict[Path, tuple[DirectoryConfig, _Stamp]]:
    """`matching_files` with each file's (inode, size, mtime): what tells a file replaced or
    changed since it was last looked at.
    """
    found = {}
    for path, directory in matching_files(directories).items():
        with contextlib.suppress(OSError):  # gone since the listing: absent
            st = path.stat()
            found[path] = (directory, (st.st_ino, st.st_size, st.st_mtime_ns))
    return found
