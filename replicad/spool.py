"""Page maps kept on local disk, so one huge transaction or merge never has to fit in memory.

A `PageSpool` maps page numbers to their newest content like a dict, but the pages live in an
unlinked file in the database's state directory and only the page-number index stays in memory
(about 100 bytes a page, against 4 KiB and more for the page itself).  The file is unlinked the
moment it is created, so a crash or SIGKILL leaves nothing behind and the space returns to the
file system as soon as the descriptor is closed.

Users: the capture of a transaction larger than `Database.spill_bytes` (`replicad.db`), the
encoding of segments that hold one (`replicad.replica`), and compaction merges
(`replicad.compaction`).  Everything here blocks; call it from a worker thread.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from replicad.errors import StateError
from replicad.private import make_private_dir

#: Slots read with one pread when iterating in page order.
_READ_RUN = 64


class PageSpool:
    """Page number -> newest page bytes, the bytes in an unlinked local file.

    Iteration yields `(pgno, page)` in ascending page number.  Use from one thread at a time;
    only `close` may come from another (a cancelled task): it waits for the read or write in
    progress, so a worker thread can never touch a descriptor number reused by another file.
    """

    def __init__(self, directory: Path, page_size: int) -> None:
        self.page_size = page_size
        self._slots: dict[int, int] = {}
        self._fd: int | None = _unlinked_file(directory)
        self._directory = directory
        self._io = threading.Lock()

    def put(self, pgno: int, data: bytes | memoryview) -> None:
        """Store `data` as page `pgno`, replacing an earlier version."""
        if len(data) != self.page_size:
            raise ValueError(f"page {pgno} is {len(data)} bytes, not {self.page_size}")
        slot = self._slots.setdefault(pgno, len(self._slots))
        self._pwrite(data, slot * self.page_size)

    def put_run(self, pgnos: list[int], frames: memoryview, stride: int, skip: int) -> None:
        """Store consecutive WAL frames: page `pgnos[i]` is `frames[i*stride+skip:][:page_size]`.

        Later frames of the same page win, as in the WAL.
        """
        ps = self.page_size
        for i, pgno in enumerate(pgnos):
            start = i * stride + skip
            self.put(pgno, frames[start : start + ps])

    def get(self, pgno: int) -> bytes | None:
        """The stored page, or None."""
        slot = self._slots.get(pgno)
        if slot is None:
            return None
        return self._pread(self.page_size, slot * self.page_size)

    def __contains__(self, pgno: object) -> bool:
        return pgno in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def nbytes(self) -> int:
        """Page bytes stored (on disk, not in memory)."""
        return len(self._slots) * self.page_size

    def pgnos(self) -> list[int]:
        """The stored page numbers, ascending."""
        return sorted(self._slots)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return self.items()

    def items(self, upto: int | None = None) -> Iterator[tuple[int, bytes]]:
        """`(pgno, page)` in ascending page number, only pages <= `upto` when given.

        Reads runs of adjacent slots at once: pages stored in page order (a snapshot-like
        transaction, a merge of sorted sources) come back in few large reads.
        """
        ps = self.page_size
        order = [p for p in sorted(self._slots) if upto is None or p <= upto]
        i = 0
        while i < len(order):
            first = self._slots[order[i]]
            n = 1
            while n < _READ_RUN and i + n < len(order) and self._slots[order[i + n]] == first + n:
                n += 1
            run = self._pread(n * ps, first * ps)
            for k in range(n):
                yield order[i + k], run[k * ps : (k + 1) * ps]
            i += n

    def close(self) -> None:
        """Free the file (its space returns at once); the spool is empty afterwards."""
        with self._io:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        self._slots.clear()

    def __del__(self) -> None:
        # Captured transactions are shared by every replica's queue; the last one to drop it
        # frees the disk space, whichever that is.
        self.close()

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        try:
            with self._io:
                written = os.pwrite(self._open_fd(), data, offset)
        except OSError as exc:
            raise _state_error(self._directory, exc) from exc
        if written != len(data):
            raise StateError(f"short write to a spool file in {self._directory}")

    def _pread(self, length: int, offset: int) -> bytes:
        with self._io:
            data = os.pread(self._open_fd(), length, offset)
        if len(data) != length:
            raise StateError(f"a spool file in {self._directory} lost data (short read)")
        return data

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError("the page spool is closed")
        return self._fd


def _unlinked_file(directory: Path) -> int:
    """A new read-write file in `directory` with no name: gone when its descriptor closes."""
    try:
        make_private_dir(directory)
        fd, name = tempfile.mkstemp(prefix="spool-", dir=directory)
        os.unlink(name)
    except OSError as exc:
        raise _state_error(directory, exc) from exc
    return fd


def _state_error(directory: Path, exc: OSError) -> StateError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StateError(
            f"no space left in the state directory {directory} for a large transaction",
            hint="free space there or point `state_dir` at a larger file system; nothing is "
            "lost meanwhile: the transaction stays in the WAL and is captured once space is free",
        )
    return StateError(
        f"cannot write to the state directory {directory}: {exc.strerror}",
        hint="check that replicad's user owns it and can write to it",
    )
