"""The checksum of a whole database, kept current page by page (pure: no I/O but `save`/`load`).

Every object in a replica (format v2) records the database's checksum before it applies and
after, so consecutive objects prove they belong to one history, and a restored file proves it
equals the source at its TXID (DESIGN.md section 9).  The checksum must be cheap to keep current
while pages change, so it is a XOR over pages::

    page_hash(pgno, page) = XXH3-64 of the page, seeded with its page number
    checksum(database)    = XOR of page_hash over pages 1..db_pages (0 for no pages)

A page that was never written (the lock page, a hole) counts as zeros, which is what a restore
writes there.  XOR is its own inverse, so changing a page costs two hashes' worth of work:
remove the old page's hash, add the new one's.  `PageHashes` keeps one 8-byte hash per page
for that, in memory while small and in an unlinked file in the state directory past
`MEMORY_LIMIT` (a 1 TB database of 4 KiB pages needs 2 GiB of hashes).

XXH3 rather than a CRC: a CRC is linear, so structured differences (the same edit at two
places) can cancel in the XOR; XXH3's outputs behave as independent random values, so two
different states collide with probability about 2**-64.  It detects accidents (a stale branch,
a torn or misplaced page, a writer bug), not forgery: whoever can write the bucket can write
consistent checksums (encryption, when configured, authenticates objects).  BLAKE2b was
measured first: 3.8 us per 4 KiB page against XXH3's 0.2 us (0.44 against 17.7 on a loaded
machine), and the checksum cost 5-10% of the daemon's CPU at 500 txn/s with it.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import xxhash

from replicad.errors import StateError
from replicad.private import write_private

#: Bytes of hashes held in memory; a larger table lives in an unlinked file (memory-mapped).
MEMORY_LIMIT: Final = 32 << 20
_FILE_MAGIC: Final = b"RPLCDPH1"
_FILE_HEAD = struct.Struct("<8sIIQQ")  # magic, page size, reserved, database pages, checksum
_U64 = np.uint64


def page_hash(pgno: int, data: bytes | memoryview) -> int:
    """The 64-bit hash of page `pgno` holding `data`."""
    return xxhash.xxh3_64_intdigest(data, seed=pgno)


@lru_cache(maxsize=8)
def _zeros(page_size: int) -> bytes:
    return bytes(page_size)


def format_checksum(value: int) -> str:
    """A checksum as 16 hex digits, as it appears in keys and messages."""
    return f"{value:016x}"


def file_checksum(path: Path, page_size: int, db_pages: int) -> int:
    """The checksum of the database file at `path` (its first `db_pages` pages), read in
    bounded chunks.
    """
    return pages_checksum(path, page_size, 1, db_pages)


def pages_checksum(
    path: Path, page_size: int, start: int, pages: int, *, chunk_bytes: int = 4 << 20
) -> int:
    """The XOR of the page hashes of `pages` pages of the file at `path` from page `start`,
    read `chunk_bytes` at a time: parts of a file's checksum can be computed apart (in
    threads) and XORed.
    """
    checksum = 0
    chunk_pages = max(1, chunk_bytes // page_size)
    with path.open("rb", buffering=0) as f:
        f.seek((start - 1) * page_size)
        for first in range(start, start + pages, chunk_pages):
            count = min(chunk_pages, start + pages - first)
            data = f.read(count * page_size).ljust(count * page_size, b"\0")
            view = memoryview(data)
            for i in range(count):
                checksum ^= page_hash(first + i, view[i * page_size : (i + 1) * page_size])
    return checksum


class PageHashes:
    """One hash per page of a database and their XOR, the database's checksum.

    `set_page` and `set_size` keep `checksum` current; `diff` lists the pages two states
    disagree on.  Not thread-safe: one owner at a time.
    """

    def __init__(self, page_size: int, *, spill_dir: Path | None = None) -> None:
        self.page_size = page_size
        self.db_pages = 0
        self.checksum = 0
        self._spill_dir = spill_dir
        self._hashes: npt.NDArray[np.uint64] = np.zeros(0, dtype=_U64)

    @classmethod
    def build(
        cls,
        page_size: int,
        pages: Iterable[tuple[int, bytes | memoryview]],
        *,
        spill_dir: Path | None = None,
    ) -> PageHashes:
        """The table of a whole database from its pages, in page-number order."""
        table = cls(page_size, spill_dir=spill_dir)
        for pgno, data in pages:
            table.set_page(pgno, data)
        return table

    def copy(self) -> PageHashes:
        """An independent copy (a snapshot of the state, e.g. to persist later)."""
        other = PageHashes(self.page_size, spill_dir=self._spill_dir)
        other._reserve(self.db_pages)
        other._hashes[: self.db_pages] = self._hashes[: self.db_pages]
        other.db_pages, other.checksum = self.db_pages, self.checksum
        return other

    def set_page(self, pgno: int, data: bytes | memoryview) -> None:
        """Page `pgno` now holds `data` (the database grows to hold it if needed)."""
        if pgno > self.db_pages:
            self.set_size(pgno)
        new = page_hash(pgno, data)
        old: int = self._hashes.item(pgno - 1)
        self._hashes[pgno - 1] = new
        self.checksum ^= old ^ new

    def set_size(self, db_pages: int) -> None:
        """The database now has `db_pages` pages: pages past it leave the checksum, and new
        ones enter it as zeros until written.
        """
        if db_pages < self.db_pages:
            dropped = self._hashes[db_pages : self.db_pages]
            self.checksum ^= int(np.bitwise_xor.reduce(dropped)) if len(dropped) else 0
            self._hashes[db_pages : self.db_pages] = 0
        elif db_pages > self.db_pages:
            self._reserve(db_pages)
            zeros = _zeros(self.page_size)
            for pgno in range(self.db_pages + 1, db_pages + 1):
                h = page_hash(pgno, zeros)
                self._hashes[pgno - 1] = h
                self.checksum ^= h
        self.db_pages = db_pages

    def hashes(self) -> npt.NDArray[np.uint64]:
        """The hashes of pages 1..db_pages (a view: do not keep it across changes)."""
        return self._hashes[: self.db_pages]

    def diff(self, older: PageHashes) -> list[int]:
        """Pages (up to our size) whose content differs from `older`'s, in order."""
        common = min(self.db_pages, older.db_pages)
        changed = np.nonzero(self._hashes[:common] != older.hashes()[:common])[0] + 1
        return [*changed.tolist(), *range(common + 1, self.db_pages + 1)]

    def _reserve(self, pages: int) -> None:
        if pages <= len(self._hashes):
            return
        capacity = max(pages, 2 * len(self._hashes), 1024)
        grown = self._allocate(capacity)
        grown[: len(self._hashes)] = self._hashes
        self._hashes = grown

    def _allocate(self, capacity: int) -> npt.NDArray[np.uint64]:
        if capacity * 8 <= MEMORY_LIMIT or self._spill_dir is None:
            return np.zeros(capacity, dtype=_U64)
        # An unlinked file: the kernel pages it out under pressure, and a crash leaves nothing.
        try:
            self._spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self._spill_dir) as f:
                f.truncate(capacity * 8)
                return np.memmap(f, dtype=_U64, mode="r+", shape=(capacity,))
        except OSError as exc:
            raise StateError(
                f"cannot create the page-hash file in {self._spill_dir}: {exc.strerror}",
                hint="free space in the state directory or point state_dir elsewhere",
            ) from exc

    # -- persistence ----------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the table to `path` atomically (owner-only), for the next start."""
        head = _FILE_HEAD.pack(_FILE_MAGIC, self.page_size, 0, self.db_pages, self.checksum)
        try:
            write_private(path, (head, self.hashes().astype("<u8").tobytes()))
        except OSError as exc:
            raise StateError(f"cannot save page hashes to {path}: {exc.strerror}") from exc

    @classmethod
    def load(cls, path: Path, *, spill_dir: Path | None = None) -> PageHashes | None:
        """A table saved by `save`, or None if missing or damaged (its checksum must agree)."""
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if len(data) < _FILE_HEAD.size:
            return None
        magic, page_size, _, db_pages, checksum = _FILE_HEAD.unpack_from(data)
        body = data[_FILE_HEAD.size :]
        if magic != _FILE_MAGIC or len(body) != db_pages * 8:
            return None
        hashes = np.frombuffer(body, dtype="<u8").astype(_U64)
        if (int(np.bitwise_xor.reduce(hashes)) if db_pages else 0) != checksum:
            return None
        table = cls(page_size, spill_dir=spill_dir)
        table._reserve(db_pages)
        table._hashes[:db_pages] = hashes
        table.db_pages, table.checksum = db_pages, checksum
        return table
