"""One daemon per database on a host: locked pid files beside the database and in its state dir.

`DatabaseLock` is an `flock` on ``.<name>.replicad-lock`` beside the database file itself, so it
holds whatever `state_dir` each daemon was given (two configurations for one database, a quick
form run next to the service): a second daemon waits for it as a standby, or is refused.
`StateLock` keeps one daemon per state directory (its spool files), and `replicad snapshot`
reads its pid to signal the running daemon.

`flock` on a file of our own never touches SQLite's POSIX locks on the database.  The locks are
released by the kernel when the process exits, however it exits, so a stale file is harmless.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from replicad.errors import ReplicadError, StateError

PID_NAME = "replicad.pid"


class StateLock:
    """Holds the lock for one state directory until `release()` (or process exit)."""

    def __init__(self, state_dir: Path, what: str) -> None:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = state_dir / PID_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = read_pid(self.path)
            raise ReplicadError(
                f"another replicad (pid {pid}) is already replicating {what}",
                hint="stop it first; two daemons must never write the same replica",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        """Unlock and close (the file stays; it is only meaningful while locked)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class DatabaseLock:
    """The host-wide lock for one database file, taken before the daemon opens the database."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_lock_path(db_path)
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; False if another process does.

        Raises `StateError` if the lock file cannot be created beside the database.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(
                f"cannot create the lock file {self.path}: {exc.strerror}",
                hint="replicad needs to write in the database's directory (as SQLite does for "
                "its -wal and -shm files)",
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> int | None:
        """The pid recorded by the process holding (or last holding) the lock."""
        return read_pid(self.path)

    def release(self) -> None:
        """Unlock and close."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def db_lock_path(db_path: Path) -> Path:
    """The lock file of a database: hidden, beside it, named for it."""
    return db_path.with_name(f".{db_path.name}.replicad-lock")


def read_pid(path: Path) -> int | None:
    """The pid recorded in a pid file, or None."""
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return None


def running_daemon(state_dir: Path) -> int | None:
    """The pid of the daemon holding this state directory's lock, or None if none runs."""
    path = state_dir / PID_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_pid(path)
    finally:
        os.close(fd)
    return None
