"""One daemon per database on a host: locked pid files beside the database and in its state dir.

`DatabaseLock` is an `flock` on ``.<name>.replicad-lock`` beside the database file itself, so it
holds whatever `state_dir` each daemon was given (two configurations for one database, a quick
form run next to the service): a second daemon waits for it as a standby, or is refused.
`StateLock` keeps one daemon per state directory (its spool files), and `replicad snapshot`
reads its pid to signal the running daemon.

`flock` on a file of our own never touches SQLite's POSIX locks on the database.  The locks are
released by the kernel when the process exits, however it exits, so a stale file is harmless.
`replicad snapshot` reads the pid to signal the running daemon, but a pid file is only a
claim: `signalable_daemon` signals nothing unless the pid is, right now, a replicad process of
this user that holds the lock (Linux `/proc`), so a stale or forged file cannot aim SIGUSR1
(whose default action is to terminate) at an unrelated process.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
from pathlib import Path

from replicad.errors import ReplicadError, StateError
from replicad.private import FILE_MODE, create_private, make_state_dir, unpredictable_name

PID_NAME = "replicad.pid"
#: The device and inode of the database file the last daemon replicated.
IDENTITY_NAME = "database.id"


class StateLock:
    """Holds the lock for one state directory until `release()` (or process exit)."""

    def __init__(self, state_dir: Path, what: str) -> None:
        make_state_dir(state_dir)
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
        os.fchmod(fd, FILE_MODE)  # a file left by an older version may be wider
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


def signalable_daemon(state_dir: Path) -> int | None:
    """The pid of the replicad daemon holding this state directory's lock, proven from `/proc`;
    None if no daemon runs.  Raises `ReplicadError` when the pid file names a process that is
    not that daemon (another user's, not replicad, or not the lock's holder).
    """
    pid = running_daemon(state_dir)
    if pid is None:
        return None
    problem = _not_our_daemon(pid, state_dir / PID_NAME)
    if problem is not None:
        raise ReplicadError(
            f"refusing to signal pid {pid} named by {state_dir / PID_NAME}: {problem}",
            hint="the pid file is stale or was written by someone else; check which process "
            "replicates this database (its state directory must belong to replicad's user)",
        )
    return pid


def _not_our_daemon(pid: int, pid_path: Path) -> str | None:
    """Why `pid` is not the replicad daemon holding `pid_path`'s lock, or None if it is."""
    proc = Path(f"/proc/{pid}")
    try:
        owner = proc.stat().st_uid
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        inode = pid_path.stat().st_ino
        locks = Path("/proc/locks").read_text()
    except FileNotFoundError:
        return "no such process"
    except OSError as exc:
        return f"cannot inspect it ({exc.strerror})"
    if owner != os.getuid():
        return f"it belongs to uid {owner}, not to this user ({os.getuid()})"
    if not _is_replicad(argv):
        return "it is not a replicad process"
    if not _holds_flock(locks, pid, inode):
        return "it does not hold the state directory's lock"
    return None


def _is_replicad(argv: list[bytes]) -> bool:
    """`replicad ...` (the console script, run directly or by an interpreter) or
    `python -m replicad ...`.
    """
    words = [os.path.basename(word) for word in argv[:3]]
    return b"replicad" in words or any(
        flag == b"-m" and module == b"replicad" for flag, module in itertools.pairwise(argv[:4])
    )


def _holds_flock(locks: str, pid: int, inode: int) -> bool:
    """Whether `/proc/locks` shows `pid` holding a FLOCK on the file with this inode.

    Lines read `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF` (device and inode).
    """
    for line in locks.splitlines():
        fields = line.split()
        if (
            len(fields) >= 6
            and fields[1] == "FLOCK"
            and fields[4] == str(pid)
            and fields[5].rsplit(":", 1)[-1] == str(inode)
        ):
            return True
    return False


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
        make_state_dir(state_dir)
        tmp = state_dir / unpredictable_name(IDENTITY_NAME)
        with create_private(tmp) as f:
            f.write(current.encode())
        tmp.replace(record)
    return previous is not None and previous != current
