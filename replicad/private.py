"""Files only their owner can read: how replicad creates every local file that holds user data.

A `0600` database must not be backed up into `0644` files that any local user can read, so
every file replicad creates (spooled segments and snapshots, compaction output, file-replica
objects, restored databases) is made `0600` and every directory `0700`, whatever the umask.
Files are created with `O_CREAT | O_EXCL | O_NOFOLLOW` under names with a random part: a
symlink or a file planted at a predictable name (in a directory someone else can write) is
refused instead of followed or truncated.  Everything here blocks.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from replicad.errors import RestoreError

FILE_MODE = 0o600
DIR_MODE = 0o700
_CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def unpredictable_name(stem: str, suffix: str = ".tmp") -> str:
    """`stem`, a random part, `suffix`: a file name nobody can plant in advance."""
    return f"{stem}-{secrets.token_hex(8)}{suffix}"


def create_private(path: Path, *, read: bool = False) -> BinaryIO:
    """Create `path` (which must not exist, and is never a symlink followed) `0600`, open for
    writing (and reading with `read`).
    """
    access = os.O_RDWR if read else os.O_WRONLY
    fd = os.open(path, access | _CREATE_FLAGS, FILE_MODE)
    return os.fdopen(fd, "w+b" if read else "wb")


def create_private_fd(path: Path) -> int:
    """As `create_private`, a raw read-write descriptor."""
    return os.open(path, os.O_RDWR | _CREATE_FLAGS, FILE_MODE)


def make_private_dir(directory: Path) -> None:
    """Create `directory` `0700` if missing (missing parents as `mkdir -p` would make them)."""
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


def make_state_dir(directory: Path) -> None:
    """Create replicad's own state directory `0700`, or take away what group and others could
    do in it if it exists and is ours (one made by an older version).

    Never a shared directory: one with the sticky bit (`/tmp`) is left alone.
    """
    make_private_dir(directory)
    info = directory.stat()
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid == os.geteuid() and mode & 0o077 and not mode & stat.S_ISVTX:
        directory.chmod(mode & ~0o077)


def adopt_owner_and_mode(new: Path, replaced: Path) -> None:
    """Give `new` the owner, group and permission bits of `replaced`, which it will replace.

    `restore --force` over an application's database must leave a file the application can
    still write: as root over a `nobody`-owned `0600` file, the result is `nobody` and `0600`,
    not `root` and `0644`.  Raises `RestoreError`, before anything is replaced, when the owner
    cannot be given back (only root may give a file away).
    """
    want = replaced.stat()
    have = new.stat()
    if (have.st_uid, have.st_gid) != (want.st_uid, want.st_gid):
        try:
            os.chown(new, want.st_uid, want.st_gid)
        except PermissionError as exc:
            raise RestoreError(
                f"cannot give the restored database the owner of {replaced} "
                f"(uid {want.st_uid}, gid {want.st_gid}): {exc.strerror}; {replaced} is unchanged",
                hint="run the restore as that user (or as root), or restore to a new path",
            ) from exc
    # After chown, which clears set-id bits: the replaced file's bits, exactly.
    os.chmod(new, stat.S_IMODE(want.st_mode))


def write_private(path: Path, chunks: Iterable[bytes]) -> None:
    """Write `chunks` to `path` atomically, readable by the owner only: a crash leaves the old
    file or the new one, never a mix.  The temporary file beside it is created exclusively
    under an unpredictable name.  Raises `OSError` (the temporary file is removed).
    """
    tmp = path.with_name(unpredictable_name(f".{path.name}"))
    try:
        with create_private(tmp) as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
