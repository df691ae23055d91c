"""The page writer: each page's newest version written once to OUT.tmp, in runs."""

from __future__ import annotations

import concurrent.futures
import errno
import os
from collections import deque

import numpy as np

from replicad.checksum import page_hash
from replicad.errors import RestoreError
from replicad.format import ObjectDecoder, PageEvent, TxnEndEvent

#: Most consecutive pages written with one system call.
_WRITE_RUN_PAGES = 256
#: Pages whose writes `PageWriter` tracks (a bit each, twice: 16 MiB at most).
TRACKED_PAGES = 1 << 26
#: Bitmap bytes `PageWriter` lists for one object before it merges whole bitmaps instead.
TOUCHED_MAX = 1 << 16
#: Pages `PageHasher` keeps a hash for (8 bytes each: 32 MiB at most, a 16 GB database of
#: 4 KiB pages); beyond, the proof reads the file back instead.
HASHED_PAGES = 1 << 22
#: Pages handed to the hasher's thread at a time: one hand-off per page cost about 50 us, more
#: than hashing it (segments write scattered pages, in runs of one).
_HASH_BATCH_PAGES = 256
#: Batches written but not yet hashed, at most.
_HASH_BACKLOG = 4


class PageWriter:
    """Writes the pages of objects applied newest first: each page's newest version, once.

    A page already written by a newer object is skipped, so a page is written once rather than
    once per object holding a version of it (an hour of history rewrites most pages several
    times; they are still decoded, so every object is verified whole).  Within one object a
    later version replaces an earlier one: its pages join `_done` only when it ends.  One bit
    per page, for the first `TRACKED_PAGES` pages, keeps memory bounded whatever the
    database's size (a page beyond raises `UntrackedPage`: the caller starts again oldest first
    with `newest_first` off, writing every version), and an object costs time for its own
    pages, not the database's (a plan can hold thousands of small segments).

    Runs of consecutive pages (a snapshot's) go out in one `pwritev`: one system call per page
    made restores of 4 KiB pages twice as slow.
    """

    def __init__(self, fd: int, target: int, *, newest_first: bool) -> None:
        self.fd = fd
        self.target = target
        self.newest_first = newest_first
        self._tracked = TRACKED_PAGES if newest_first else 0
        self.page_size = 0
        self.db_pages = 0
        self._txid = 0  # the newest transaction seen, whose database size the result takes
        self._done = bytearray()  # a bit per page written by an object that has ended
        self._mine = bytearray()  # the same for the object being applied; zeros between objects
        self._touched: list[int] = []  # the bytes of `_mine` that are not zero, while few
        self._many = False  # too many to list: the whole of `_mine` is merged
        self._run_start = 0
        self._run: list[bytes] = []
        self._highest = 0  # the highest page number written
        #: Hashes each run as it is written, for the proof (None: the proof reads the file).
        self.hasher: PageHasher | None = PageHasher() if newest_first else None

    def feed(self, decoder: ObjectDecoder, chunk: bytes | memoryview) -> None:
        """Decode the next chunk of an object and write its pages."""
        events = decoder.feed(chunk)
        if decoder.header is not None:
            self._check_page_size(decoder.header.page_size)
        target, tracked, done, mine = self.target, self._tracked, self._done, self._mine
        touch = _ignore if self._many else self._touched.append
        for event in events:
            if type(event) is PageEvent:  # the hot loop: about one event per page
                pgno = event.pgno
                if event.txid > target:
                    continue
                if pgno < tracked:
                    byte, bit = pgno >> 3, 1 << (pgno & 7)
                    if byte < len(done) and done[byte] & bit:
                        continue  # a newer object wrote this page
                    if byte >= len(mine):
                        mine.extend(bytes(byte + 1 - len(mine) + 4096))
                    if not mine[byte]:
                        touch(byte)
                    mine[byte] |= bit
                elif self.newest_first:
                    raise UntrackedPage(pgno)
                self._write(pgno, event.data)
            elif type(event) is TxnEndEvent and self._txid < event.info.txid <= target:
                self._txid, self.db_pages = event.info.txid, event.info.db_pages
        if len(self._touched) > TOUCHED_MAX:  # checked per chunk: a chunk's pages more at most
            self._many = True
            self._touched.clear()

    def end_object(self, decoder: ObjectDecoder) -> None:
        """The object has ended: check it was whole, and mark its pages written."""
        decoder.close()
        mine, done = self._mine, self._done
        if len(done) < len(mine):
            done.extend(bytes(len(mine) - len(done)))
        if self._many:
            size = len(mine)
            either = int.from_bytes(done[:size], "little") | int.from_bytes(mine, "little")
            done[:size] = either.to_bytes(size, "little")
            mine[:] = bytes(size)
        else:
            for byte in self._touched:
                done[byte] |= mine[byte]
                mine[byte] = 0
        self._touched.clear()
        self._many = False

    def _check_page_size(self, page_size: int) -> None:
        if self.page_size and page_size != self.page_size:
            raise RestoreError(
                f"objects disagree on page size ({self.page_size} and {page_size})",
                hint="the replica mixes databases; restore from a clean prefix",
            )
        self.page_size = page_size

    def _write(self, pgno: int, data: bytes) -> None:
        if self._run and pgno != self._run_start + len(self._run):
            self._flush()
        if not self._run:
            self._run_start = pgno
        self._run.append(data)
        if len(self._run) >= _WRITE_RUN_PAGES:
            self._flush()

    def _flush(self) -> None:
        if self._run:
            wanted = len(self._run) * self.page_size
            if os.pwritev(self.fd, self._run, (self._run_start - 1) * self.page_size) != wanted:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # short write: disk full
            self._highest = max(self._highest, self._run_start + len(self._run) - 1)
            if self.hasher is not None:
                self.hasher.add(self._run_start, self._run)
            self._run = []

    def finish(self) -> None:
        """Write what is pending and cut the file to the target's size (the caller fsyncs).

        Every page up to the database's size was written by some object (a snapshot holds them
        all; SQLite writes each page it adds to the WAL), so a size past the highest page
        written (allowing for the lock page, which is never written) is a damaged or crafted
        object: refused before it makes a sparse file of terabytes.
        """
        self._flush()
        if self.db_pages > self._highest + 1:
            raise RestoreError(
                f"the objects say the database has {self.db_pages} pages, but none was written "
                f"past page {self._highest}",
                hint="the replica is damaged or was written by something else; run `replicad "
                "verify`, and try an earlier --txid or another replica",
            )
        os.ftruncate(self.fd, self.db_pages * self.page_size)


class UntrackedPage(Exception):
    """A page number beyond `TRACKED_PAGES`, met while applying newest first."""


def _ignore(_: int) -> None:
    """Takes an argument and does nothing: `PageWriter`'s `touch` when it stopped listing."""


class PageHasher:
    """The page hashes (`replicad.checksum.page_hash`) of the pages a `PageWriter` writes,
    computed by a thread of its own while decoding and downloading go on, so the proof needs no
    second pass over the file (that pass took as long as decoding and writing together).

    It hashes the very bytes handed to `pwritev`, at the page numbers they are written to.
    Pages are written once each (newest first), so the table holds each page's final content;
    `checksum` then takes pages up to the final size, counting pages never written (the lock
    page, holes) as zeros, as the checksum's definition does.  A page number past
    `HASHED_PAGES` turns it off (`overflowed`): the caller proves by reading the file instead.
    """

    def __init__(self) -> None:
        self._hashes = np.zeros(0, dtype=np.uint64)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="page-hasher")
        self._pending: deque[concurrent.futures.Future[None]] = deque()
        self._batch: list[tuple[int, list[bytes]]] = []
        self._batched = 0
        self.overflowed = False

    def add(self, start: int, pages: list[bytes]) -> None:
        """Hash `pages`, written from page `start` on (in the hasher's thread, in batches)."""
        if self.overflowed or start + len(pages) > HASHED_PAGES:
            self.overflowed = True
            return
        self._batch.append((start, pages))
        self._batched += len(pages)
        if self._batched >= _HASH_BATCH_PAGES:
            self._submit()

    def _submit(self) -> None:
        while len(self._pending) >= _HASH_BACKLOG:  # bounded memory: wait for the oldest
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._hash, self._batch))
        self._batch, self._batched = [], 0

    def _hash(self, runs: list[tuple[int, list[bytes]]]) -> None:
        end = max(start + len(pages) for start, pages in runs)
        if end > len(self._hashes):
            grown = np.zeros(max(end, 2 * len(self._hashes)), dtype=np.uint64)
            grown[: len(self._hashes)] = self._hashes
            self._hashes = grown
        hashes = self._hashes
        for start, pages in runs:  # in order: a page written twice takes its later version
            for i, page in enumerate(pages):
                hashes[start + i] = page_hash(start + i, page)

    def checksum(self, page_size: int, db_pages: int) -> int | None:
        """The database checksum of pages 1..`db_pages` as written (None if `overflowed`)."""
        try:
            if self._batch and not self.overflowed:
                self._submit()
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(cancel_futures=True)
        if self.overflowed:
            return None
        table = np.zeros(db_pages + 1, dtype=np.uint64)
        known = min(len(self._hashes), db_pages + 1)
        table[:known] = self._hashes[:known]
        checksum = int(np.bitwise_xor.reduce(table[1:]))
        zeros = bytes(page_size)
        # A hash of 0 means "never written" (a real page hashes to 0 with odds of 2**-64).
        for pgno in np.flatnonzero(table[1:] == 0):
            checksum ^= page_hash(int(pgno) + 1, zeros)
        return checksum

    def close(self) -> None:
        """Stop the thread (after an error; `checksum` stops it otherwise)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
