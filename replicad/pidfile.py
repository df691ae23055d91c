"""One daemon per database on a host: a locked pid file in the database's state directory.

`flock` on a file of our own never touches SQLite's POSIX locks on the database.  The lock is
released by the kernel when the process exits, however it exits, so a stale file is harmless.
`replicad snapshot` reads the pid to signal the running daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from replicad.errors import ReplicadError

PID_NAME = "replicad.pid"
#: The device and inode of the database file the last daemon replicated.
IDENTITY_NAME = "database.id"


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


def database_replaced(state_dir: Path, db_path: Path) -> bool:
    """Whether `db_path` is another file than the one the last daemon here replicated (its
    device and inode differ from those recorded), so a snapshot can say why it was needed.

    Records the current file's identity for the next start.  False when nothing was recorded.
    """
    st = db_path.stat()
    current = f"{st.st_dev} {st.st_ino}\n"
    record = state_dir / IDENTITY_NAME
    try:
        previous: str | None = record.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        previous = None
    if previous != current:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(current)
        tmp.replace(record)
    return previous is not None and previous != current
