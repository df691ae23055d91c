"""One replicated SQLite database: its connections, the read-mark discipline, the sync step.

Everything here blocks (SQLite calls and file reads) and is meant to run in a worker thread,
one call at a time per `Database`.  Nothing here touches a replica: the sync step *captures*
committed transactions into memory and the caller ships them.

How frames are protected until captured (DESIGN.md section 3): two read-only connections take
turns holding a read transaction ("leapfrog").  Each sync begins a read transaction on the idle
holder, reads the WAL to its last valid commit, and only then ends the other holder.  While any
holder has a read mark above 0 no writer can restart the WAL; a holder on mark 0 blocks every
backfill, so at most one restart can happen under it and that restart only erases frames that
were fully backfilled when it began - frames already captured.  So a salt change seen while a
holder was held continuously means the new generation continues right after our position.

The daemon never opens-and-closes the database or its `-shm` file outside SQLite: closing any
descriptor on them would drop this process's POSIX locks, including SQLite's own.  The raw
descriptor used to read pages for snapshots is opened before the SQLite connections and closed
after them.  The `-wal` file carries no locks and is opened freely.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from replicad.checksum import PageHashes
from replicad.errors import DatabaseError, SnapshotRetry, WalError
from replicad.position import WalPosition
from replicad.spool import PageSpool
from replicad.wal import (
    FRAME_HEADER_SIZE,
    WAL_HEADER_SIZE,
    FrameRun,
    StopReason,
    WalHeader,
    WalScan,
    parse_wal_header,
    scan_frames,
    verify_frames,
)

SQLITE_MAGIC = b"SQLite format 3\x00"
_DB_HEADER_SIZE = 100
_LOCK_BYTE = 1 << 30

#: How long beginning a holder's read transaction may wait (WAL recovery by another process).
DEFAULT_BUSY_TIMEOUT_MS = 1000
#: WAL bytes captured by one sync call; bounds the memory of one step (a larger transaction is
#: still captured whole, since a transaction cannot be split).
DEFAULT_MAX_SYNC_BYTES = 64 << 20
#: A transaction with more WAL bytes than this is captured into a spool file in the state
#: directory instead of memory (`replicad.spool`), so its size does not bound the daemon's.
DEFAULT_SPILL_BYTES = 16 << 20
#: Read size when scanning the WAL; grows (up to the spill size) when a transaction is larger.
_READ_CHUNK = 4 << 20
#: First read of a sync; later reads grow to `_READ_CHUNK`.
_FIRST_READ = 128 << 10
#: Pages read per pread while streaming a snapshot.
_SNAPSHOT_CHUNK_PAGES = 256


@dataclass(frozen=True, slots=True)
class CapturedTxn:
    """One committed SQLite transaction, read from the WAL and held until every replica has it.

    `pages` is a list in memory, or for a transaction above the spill size a `PageSpool` on
    local disk (freed when the last replica queue drops the transaction).  `pre` and `post`
    are the database's checksum before and after it (`replicad.checksum`).
    """

    txid: int
    commit_time_ns: int
    db_pages: int
    pages: list[tuple[int, bytes]] | PageSpool
    end: WalPosition
    pre: int
    post: int

    @property
    def nbytes(self) -> int:
        """Bytes of this transaction's pages, in memory or spooled."""
        if isinstance(self.pages, PageSpool):
            return self.pages.nbytes
        return sum(len(data) for _, data in self.pages)

    @property
    def spooled(self) -> bool:
        """True when the pages are on local disk rather than in memory."""
        return isinstance(self.pages, PageSpool)


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one sync step found."""

    transactions: list[CapturedTxn]
    #: Set when the WAL no longer continues from our position; a snapshot is needed.
    lost_continuity: str | None = None
    #: True when the step stopped at its byte budget and more committed frames remain.
    more: bool = False
    #: Size of the -wal file when it was read.
    wal_size: int = 0


@dataclass(slots=True)
class DatabaseState:
    """Where replication stands: the resume point and the last TXID captured."""

    position: WalPosition | None = None
    txid: int = 0
    db_pages: int = 0
    #: Offset of the newest frame of each page in the current WAL generation, up to
    #: `position`: the pages a snapshot must take from the WAL instead of the database file.
    overlay: dict[int, int] = field(default_factory=dict)
    #: Page hashes of the database as of `txid`, kept current by each capture; None between a
    #: fresh start and the snapshot that reads every page (`adopt_hashes`).
    hashes: PageHashes | None = None


@dataclass(frozen=True, slots=True)
class SnapshotSource:
    """A consistent view of the database as of `txid`, readable page by page."""

    txid: int
    page_size: int
    db_pages: int
    position: WalPosition
    #: Commit time of the state (observed), Unix ns.
    time_ns: int


class Database:
    """One SQLite database in WAL mode, replicated by reading its WAL.

    Lifecycle: `open()`, then `sync()` repeatedly, `snapshot_source()` + `iter_snapshot_pages()`
    when a snapshot is needed, and `close()`.  Not thread-safe: call from one thread at a time.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        max_sync_bytes: int = DEFAULT_MAX_SYNC_BYTES,
        spill_dir: Path | None = None,
        spill_bytes: int = DEFAULT_SPILL_BYTES,
    ) -> None:
        self.path = path
        self.wal_path = path.with_name(path.name + "-wal")
        self.busy_timeout_ms = busy_timeout_ms
        self.max_sync_bytes = max_sync_bytes
        #: Where large transactions are spooled: the daemon passes the state directory.
        self.spill_dir = spill_dir or Path(tempfile.gettempdir())
        self.spill_bytes = max(spill_bytes, _FIRST_READ)
        self.state = DatabaseState()
        self.page_size = 0
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._holders: list[sqlite3.Connection] = []
        self._active: int | None = None
        self._last_commit_ns = 0

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Check the file is a SQLite database in WAL mode and open the holder connections.

        Raises `DatabaseError` with guidance when the file is missing, not SQLite, or not WAL.
        """
        header = self._open_raw()
        try:
            self.page_size = _page_size_from_header(header, self.path)
            self._holders = [self._connect() for _ in range(2)]
            self._begin(0)
            self._active = 0
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """End read transactions and close connections, then the raw descriptor (in that order)."""
        for conn in self._holders:
            conn.close()
        self._holders = []
        self._active = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def is_replaced(self) -> bool:
        """True when the path names another file than the one we opened (a restored backup)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._inode

    def _open_raw(self) -> bytes:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise DatabaseError(
                f"database {self.path} does not exist",
                hint="check the path, or start the application first so it creates the database",
            ) from exc
        except OSError as exc:
            raise DatabaseError(f"cannot open database {self.path}: {exc.strerror}") from exc
        self._fd = fd
        st = os.fstat(fd)
        self._inode = (st.st_dev, st.st_ino)
        return os.pread(fd, _DB_HEADER_SIZE, 0)

    def _connect(self) -> sqlite3.Connection:
        # Read-only: a read-only connection never checkpoints or deletes the WAL when it
        # closes, so stopping the daemon never changes the application's files.
        uri = f"file:{_uri_path(self.path)}?mode=ro"
        try:
            conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, timeout=0
            )
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open database {self.path}: {exc}") from exc
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        return conn

    def generation(self) -> tuple[int, int] | None:
        """Salts of the WAL generation replication stands in, or None."""
        pos = self.state.position
        if pos is None or pos.salt1 < 0:
            return None
        return (pos.salt1, pos.salt2)

    def generation_frames(self) -> int:
        """Frames of the current WAL generation captured so far (what a checkpoint would copy)."""
        pos = self.state.position
        if pos is None or pos.salt1 < 0 or not self.page_size:
            return 0
        return (pos.offset - WAL_HEADER_SIZE) // (FRAME_HEADER_SIZE + self.page_size)

    # -- read holders ------------------------------------------------------------------------

    def _begin(self, index: int) -> None:
        conn = self._holders[index]
        conn.execute("BEGIN")
        try:
            # A read inside BEGIN takes the WAL read mark and keeps it until COMMIT.
            conn.execute("PRAGMA schema_version").fetchone()
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise DatabaseError(f"cannot begin a read transaction on {self.path}: {exc}") from exc

    def _end(self, index: int) -> None:
        self._holders[index].execute("COMMIT")

    def _begin_next_holder(self) -> int | None:
        """Begin a read transaction on the idle holder; None if SQLite said busy."""
        assert self._active is not None
        idle = 1 - self._active
        try:
            self._begin(idle)
        except DatabaseError:
            return None
        return idle

    def _leapfrog(self, new: int | None, *, advance: bool) -> None:
        """End the old holder once everything its successor can see has been captured."""
        if new is None:
            return
        if advance:
            assert self._active is not None
            self._end(self._active)
            self._active = new
        else:
            self._end(new)

    # -- sync step -------------------------------------------------------------------------

    def sync(self) -> SyncResult:
        """Capture the committed transactions appended to the WAL since the last sync.

        Requires a position (`resume()` or a snapshot sets one).  Returns the transactions with
        TXIDs assigned; on a lost continuity returns its reason and forgets the position.
        """
        if self.state.position is None:
            raise RuntimeError("sync() before a position was established")
        if self.is_replaced():
            return self._lose("the database file was replaced (inode changed)")
        new = self._begin_next_holder()
        try:
            result = self._capture()
        except BaseException:
            self._leapfrog(new, advance=False)
            raise
        # Only a holder whose whole view was captured may become the sole protector.
        self._leapfrog(new, advance=not result.more and result.lost_continuity is None)
        return result

    def _capture(self) -> SyncResult:
        with _WalFile.open(self.wal_path) as wal:
            header = self._read_header(wal)
            if header is None:
                # Empty or just-truncated WAL: nothing new; a new header will come with new salts.
                return SyncResult([], wal_size=wal.size)
            reason = self._check_generation(header, wal.size)
            if reason is not None:
                return self._lose(reason, wal.size)
            txns, more = self._read_transactions(wal, header, self.max_sync_bytes)
            return SyncResult(txns, more=more, wal_size=wal.size)

    def _read_header(self, wal: _WalFile) -> WalHeader | None:
        if wal.size < WAL_HEADER_SIZE:
            return None
        try:
            header = parse_wal_header(wal.read(0, WAL_HEADER_SIZE))
        except WalError:
            # SQLite treats a WAL whose header fails its checksum as empty; so do we.
            return None
        return header

    def _check_generation(self, header: WalHeader, wal_size: int) -> str | None:
        """None if reading can continue from our position; else why continuity is lost."""
        pos = self.state.position
        assert pos is not None
        if header.page_size != self.page_size:
            return f"page size changed from {self.page_size} to {header.page_size}"
        if pos.same_generation(header.salt1, header.salt2):
            if wal_size < pos.offset:
                return f"WAL shrank to {wal_size} bytes, below our offset {pos.offset}"
            return None
        # A restart while we held a read mark: it only erased frames we had captured, so the new
        # generation continues our history from its first frame.
        self.state.position = header.initial_position()
        self.state.overlay.clear()
        return None

    def _read_transactions(
        self, wal: _WalFile, header: WalHeader, budget: int
    ) -> tuple[list[CapturedTxn], bool]:
        captured: list[CapturedTxn] = []
        start = self._position().offset
        while True:
            oversized = False
            for scan in _scan_wal(wal, header, self._position(), max_read=self.spill_bytes):
                if isinstance(scan, _Oversized):
                    oversized = True
                    break
                captured.extend(self._accept(scan))
                if self._position().offset - start >= budget:
                    return captured, True
            if not oversized:
                return captured, False
            large = self._capture_large(wal, header)
            if large is None:
                return captured, False  # still being written (or rolled back): next time
            captured.append(large)
            if self._position().offset - start >= budget:
                return captured, True

    def _capture_large(self, wal: _WalFile, header: WalHeader) -> CapturedTxn | None:
        """Capture the one transaction at our position into a spool file, in bounded reads.

        A first pass only verifies that its commit frame is in the log, so a transaction still
        being written costs reads but no spool writes; the second pass, over frames our read
        holder now protects, copies the pages.  None when the log ends before the commit.
        """
        start = self._position()
        found = _walk_transaction(wal, header, start, None)
        if found is None:
            return None
        spool = PageSpool(self.spill_dir, self.page_size)
        overlay: dict[int, int] = {}

        def keep(run: FrameRun, raw: bytes, count: int) -> None:
            pgnos = run.fields[:count, 0].tolist()
            spool.put_run(pgnos, memoryview(raw), run.frame_size, FRAME_HEADER_SIZE)
            _note_frames(overlay, run, raw, count)

        try:
            if _walk_transaction(wal, header, start, keep) != found:
                raise WalError("the WAL changed while a large transaction was being captured")
        except BaseException:
            spool.close()
            raise
        end, db_pages = found
        self.state.overlay.update(overlay)
        return self._record(db_pages, spool, end, self._commit_time())

    def _position(self) -> WalPosition:
        assert self.state.position is not None
        return self.state.position

    def _accept(self, scan: WalScan) -> list[CapturedTxn]:
        """Assign TXIDs, record pages in the overlay and advance the position."""
        now = self._commit_time()
        out: list[CapturedTxn] = []
        for txn in scan.transactions:
            pages: dict[int, bytes] = {}
            for frame in txn.frames:
                pages[frame.pgno] = bytes(frame.data)
                self.state.overlay[frame.pgno] = frame.offset
            out.append(self._record(txn.db_pages, list(pages.items()), txn.end, now))
        return out

    def _hashes(self) -> PageHashes:
        hashes = self.state.hashes
        if hashes is None:
            raise RuntimeError("capture before the page hashes were built")
        return hashes

    def _commit_time(self) -> int:
        """When the commits seen now happened, as observed: never before the previous ones."""
        self._last_commit_ns = max(time.time_ns(), self._last_commit_ns)
        return self._last_commit_ns

    def _record(
        self,
        db_pages: int,
        pages: list[tuple[int, bytes]] | PageSpool,
        end: WalPosition,
        commit_ns: int,
    ) -> CapturedTxn:
        """The next TXID; advances the state (position, page hashes) past the transaction."""
        hashes = self._hashes()
        pre = hashes.checksum
        for pgno, data in pages:
            hashes.set_page(pgno, data)
        hashes.set_size(db_pages)
        self.state.txid += 1
        self.state.db_pages = db_pages
        self.state.position = end
        return CapturedTxn(self.state.txid, commit_ns, db_pages, pages, end, pre, hashes.checksum)

    def _lose(self, reason: str, wal_size: int = 0) -> SyncResult:
        self.state.position = None
        self.state.overlay.clear()
        self.state.hashes = None
        return SyncResult([], lost_continuity=reason, wal_size=wal_size)

    # -- resuming ----------------------------------------------------------------------------

    def resume(
        self, position: WalPosition, *, txid: int, db_pages: int, checksum: int | None = None
    ) -> str | None:
        """Continue from a position a replica recorded, if the WAL still holds it.

        Verifies the checksum chain from the start of the current generation up to `position`,
        so frames we never saw cannot slip in, then hashes every page of the state there and
        compares the database checksum with the replica's (`checksum`; None for a v1 replica,
        which records none): pages checkpointed past the position while replicad was not running
        would otherwise make the next objects' checksums wrong.  Returns None on success, else
        the reason the position cannot be trusted (the caller then ships what changed, or a
        snapshot).
        """
        with _WalFile.open(self.wal_path) as wal:
            header = self._read_header(wal)
            if header is None:
                return "the WAL is empty or was truncated while replicad was not running"
            if not position.same_generation(header.salt1, header.salt2):
                return "the WAL was restarted while replicad was not running"
            if header.page_size != self.page_size:
                return f"page size changed to {header.page_size}"
            overlay, end, last_pages = _index_generation(wal, header, position.offset)
        if end != position:
            return "the WAL no longer holds the frames at the replica's last position"
        state = DatabaseState(position, txid, last_pages or db_pages, overlay)
        source = SnapshotSource(txid, self.page_size, state.db_pages, position, 0)
        saved, self.state = self.state, state
        try:
            state.hashes = self.page_hashes(source)
        except SnapshotRetry as exc:
            self.state = saved
            return str(exc)
        if checksum is not None and state.hashes.checksum != checksum:
            self.state = saved
            return (
                "the database differs from the replica's last state (its checksum does not "
                "match): it was checkpointed past that position while replicad was not running"
            )
        return None

    def page_hashes(self, source: SnapshotSource) -> PageHashes:
        """Hash every page of the state `source` describes (reads the whole database)."""
        return PageHashes.build(
            self.page_size, self.iter_snapshot_pages(source), spill_dir=self.spill_dir
        )

    def adopt_hashes(self, hashes: PageHashes) -> None:
        """The page hashes of the current state, computed while a snapshot read every page."""
        self.state.hashes = hashes

    def read_pages(self, source: SnapshotSource, pgnos: list[int]) -> list[tuple[int, bytes]]:
        """The given pages of the state `source` describes (a restart's changed pages)."""
        wanted = set(pgnos)
        return [(p, d) for p, d in self.iter_snapshot_pages(source) if p in wanted]

    def start_fresh(self, *, base_txid: int) -> SnapshotSource:
        """Index the whole current WAL and describe a snapshot at TXID `base_txid + 1`.

        Used at first start and after a lost continuity: the state at the end of the WAL becomes
        one "jump" transaction, since how many commits led to it is unknown.
        """
        with _WalFile.open(self.wal_path) as wal:
            header = self._read_header(wal)
            if header is None:
                position = None
                overlay: dict[int, int] = {}
                db_pages = 0
            else:
                if header.page_size != self.page_size:
                    raise DatabaseError(
                        f"{self.wal_path} has page size {header.page_size} but the database "
                        f"{self.page_size}",
                        hint="the WAL does not belong to this database; stop the application "
                        "and check the files",
                    )
                overlay, position, db_pages = _index_generation(wal, header, None)
        if not db_pages:
            db_pages = self._db_pages_from_file()
        if position is None:
            position = _empty_position()
        self.state = DatabaseState(position, base_txid + 1, db_pages, overlay)
        self._last_commit_ns = max(time.time_ns(), self._last_commit_ns)
        return SnapshotSource(
            base_txid + 1, self.page_size, db_pages, position, self._last_commit_ns
        )

    def current_source(self) -> SnapshotSource:
        """Describe a snapshot at the last captured TXID (sync to the end of the WAL first).

        Call `iter_snapshot_pages` next, before any other sync, so the same holder pins it.
        """
        return SnapshotSource(
            self.state.txid,
            self.page_size,
            self.state.db_pages,
            self._position(),
            self._last_commit_ns or time.time_ns(),
        )

    def reopen(self) -> None:
        """Close and open again (the file was replaced); keeps the capture counter."""
        txid = self.state.txid
        self.close()
        self.open()
        self.state = DatabaseState(txid=txid)

    def _db_pages_from_file(self) -> int:
        assert self._fd is not None
        header = os.pread(self._fd, _DB_HEADER_SIZE, 0)
        size = os.fstat(self._fd).st_size // self.page_size
        in_header = int.from_bytes(header[28:32], "big")
        # The in-header size is valid only when its "version-valid-for" matches the counter.
        if in_header and header[24:28] == header[92:96]:
            return in_header
        return size

    # -- snapshots ---------------------------------------------------------------------------

    def iter_snapshot_pages(self, source: SnapshotSource) -> Iterator[tuple[int, bytes]]:
        """Every page of the database as of `source.txid`, in page-number order.

        Pages come from the database file, overridden by the newest WAL frame of the current
        generation up to the source's position.  The holder's read mark keeps both stable; a WAL
        restart during the read (possible only when nothing needed overriding) is detected at
        the end and raises `SnapshotRetry`.
        """
        assert self._fd is not None
        ps = self.page_size
        lock_page = _LOCK_BYTE // ps + 1
        zeros = bytes(ps)
        overlay = dict(self.state.overlay)
        with _WalFile.open(self.wal_path) as wal:
            for first in range(1, source.db_pages + 1, _SNAPSHOT_CHUNK_PAGES):
                last = min(first + _SNAPSHOT_CHUNK_PAGES - 1, source.db_pages)
                chunk = os.pread(self._fd, (last - first + 1) * ps, (first - 1) * ps)
                for pgno in range(first, last + 1):
                    if pgno == lock_page:
                        yield pgno, zeros  # SQLite never writes the lock page
                        continue
                    offset = overlay.get(pgno)
                    if offset is not None:
                        yield pgno, _read_overlay_frame(wal, source.position, offset, pgno, ps)
                    else:
                        yield pgno, _page_in_chunk(chunk, (pgno - first) * ps, pgno, ps)
            self._check_generation_unchanged(wal, source)

    def _check_generation_unchanged(self, wal: _WalFile, source: SnapshotSource) -> None:
        if source.position.offset == WAL_HEADER_SIZE and not self.state.overlay:
            return
        header = self._read_header(wal)
        if header is None or not source.position.same_generation(header.salt1, header.salt2):
            raise SnapshotRetry("the WAL restarted while the snapshot was being read")


def _page_in_chunk(chunk: bytes, start: int, pgno: int, page_size: int) -> bytes:
    page = chunk[start : start + page_size]
    if len(page) != page_size:
        raise SnapshotRetry(f"page {pgno} is beyond the end of the database file")
    return page


def _read_overlay_frame(
    wal: _WalFile, position: WalPosition, offset: int, pgno: int, page_size: int
) -> bytes:
    frame = wal.read(offset, FRAME_HEADER_SIZE + page_size)
    if len(frame) != FRAME_HEADER_SIZE + page_size:
        raise SnapshotRetry("the WAL was truncated while the snapshot was being read")
    fields = frame[:FRAME_HEADER_SIZE]
    if (
        int.from_bytes(fields[0:4], "big") != pgno
        or int.from_bytes(fields[8:12], "big") != position.salt1
        or int.from_bytes(fields[12:16], "big") != position.salt2
    ):
        raise SnapshotRetry("the WAL restarted while the snapshot was being read")
    return frame[FRAME_HEADER_SIZE:]


def _index_generation(
    wal: _WalFile, header: WalHeader, stop_offset: int | None
) -> tuple[dict[int, int], WalPosition, int]:
    """Scan the generation from its start: page -> newest frame offset, end position, db size.

    Stops at `stop_offset` when given (the end must then land exactly on it to be trusted).
    """
    overlay: dict[int, int] = {}
    end = header.initial_position()
    db_pages = 0
    note = functools.partial(_note_frames, overlay)

    while True:
        oversized = False
        for scan in _scan_wal(wal, header, end, limit=stop_offset, max_read=DEFAULT_SPILL_BYTES):
            if isinstance(scan, _Oversized):
                oversized = True
                break
            for txn in scan.transactions:
                for frame in txn.frames:
                    overlay[frame.pgno] = frame.offset
                db_pages = txn.db_pages
            end = scan.end
        if not oversized:
            return overlay, end, db_pages
        found = _walk_transaction(wal, header, end, note, limit=stop_offset)
        if found is None:
            return overlay, end, db_pages
        end, db_pages = found


def _note_frames(overlay: dict[int, int], run: FrameRun, _raw: bytes, count: int) -> None:
    """Record the first `count` frames of `run` as the newest of their pages."""
    pgnos = run.fields[:count, 0].tolist()
    overlay.update((p, run.offset + i * run.frame_size) for i, p in enumerate(pgnos))


@dataclass(frozen=True, slots=True)
class _Oversized:
    """`_scan_wal` stopped: the transaction at its position is larger than one bounded read."""


def _walk_transaction(
    wal: _WalFile,
    header: WalHeader,
    start: WalPosition,
    visit: Callable[[FrameRun, bytes, int], None] | None,
    *,
    limit: int | None = None,
) -> tuple[WalPosition, int] | None:
    """Verify the one transaction beginning at `start`, reading `_READ_CHUNK` at a time.

    `visit(run, raw, count)` sees each read and how many of its frames belong to the
    transaction.  Returns the position after the commit frame and the database size it
    records, or None when the log (or `limit`) ends before a commit.
    """
    frame_size = header.frame_size
    end_of_file = wal.size if limit is None else min(limit, wal.size)
    chunk = max(1, _READ_CHUNK // frame_size) * frame_size
    pos = start
    while pos.offset + frame_size <= end_of_file:
        whole = (end_of_file - pos.offset) // frame_size * frame_size
        raw = wal.read(pos.offset, min(chunk, whole))
        run = verify_frames(header, raw, pos)
        commit = run.first_commit()
        count = len(run) if commit is None else commit + 1
        if count and visit is not None:
            visit(run, raw, count)
        if commit is not None:
            return run.position_after(commit, header), int(run.fields[commit, 1])
        if not count or count * frame_size < len(raw):
            return None  # an invalid frame ends the log inside the transaction
        pos = run.position_after(count - 1, header)
    return None


def _scan_wal(
    wal: _WalFile,
    header: WalHeader,
    start: WalPosition,
    *,
    limit: int | None = None,
    max_read: int | None = None,
) -> Iterator[WalScan | _Oversized]:
    """Scan committed transactions from `start` to the end of the log, in bounded reads.

    A read holds whole frames; when no commit fits in it (a large transaction) the next read
    is doubled.  Past `max_read` bytes it yields `_Oversized` and stops instead: the caller
    reads that transaction piecewise (`_walk_transaction`) and scans on after it.
    """
    frame_size = header.frame_size
    end_of_file = wal.size if limit is None else min(limit, wal.size)
    default_frames = max(1, _READ_CHUNK // frame_size)
    # Start small: a sync usually finds a few new frames, and after a WAL restart the file keeps
    # its old size, full of stale frames that would otherwise be read and checksummed each time.
    chunk_frames = max(1, _FIRST_READ // frame_size)
    pos = start
    while pos.offset + frame_size <= end_of_file:
        length = min(chunk_frames * frame_size, end_of_file - pos.offset)
        scan = scan_frames(header, wal.read(pos.offset, length), pos)
        yield scan
        if scan.stop_reason in (StopReason.SALT_MISMATCH, StopReason.CHECKSUM_MISMATCH):
            return  # an invalid frame ends the log; what follows is not ours
        if pos.offset + length >= end_of_file:
            return
        if scan.transactions:
            pos = scan.end
            chunk_frames = max(chunk_frames, default_frames)
        elif max_read is not None and 2 * chunk_frames * frame_size > max_read:
            yield _Oversized()
            return
        else:
            chunk_frames *= 2  # one transaction larger than the read: read more at once


def _empty_position() -> WalPosition:
    """A position matching no generation: the first header seen starts a new one."""
    return WalPosition(salt1=-1, salt2=-1, offset=WAL_HEADER_SIZE, checksum1=0, checksum2=0)


class _WalFile:
    """The -wal file opened for one step; SQLite keeps no locks on it, so closing is safe."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self.size = os.fstat(fd).st_size if fd is not None else 0

    @classmethod
    def open(cls, path: Path) -> _WalFile:
        try:
            return cls(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            return cls(None)

    def read(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            return b""
        return os.pread(self._fd, length, offset)

    def __enter__(self) -> _WalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _page_size_from_header(header: bytes, path: Path) -> int:
    if len(header) < _DB_HEADER_SIZE or not header.startswith(SQLITE_MAGIC):
        raise DatabaseError(
            f"{path} is not a SQLite database",
            hint="point replicad at the database file itself, not its -wal or -shm file",
        )
    if header[18] != 2 or header[19] != 2:
        raise DatabaseError(
            f"{path} is not in WAL mode",
            hint="run `PRAGMA journal_mode=WAL;` once on the database (it persists), "
            "and set it in the application",
        )
    raw = int.from_bytes(header[16:18], "big")
    return 65536 if raw == 1 else raw


def _uri_path(path: Path) -> str:
    return quote(str(path.absolute()))
