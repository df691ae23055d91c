"""Pure parsing and checksum verification of SQLite ``-wal`` files.

No I/O: every function works on bytes the caller has read.  The daemon reads the ``-wal`` file
in bounded chunks and hands each chunk to :func:`scan_frames`, which returns the *committed*
transactions it holds and the position to resume from.

Layout (all header fields big-endian)::

    WAL header, 32 bytes: magic, format version, page size, checkpoint seq, salt-1, salt-2,
                          checksum-1, checksum-2 (over the first 24 bytes)
    frame = 24-byte frame header (page number, db size after commit or 0, salt-1, salt-2,
            checksum-1, checksum-2) + one page

The checksum is SQLite's ``walChecksumBytes``: over 32-bit words taken in pairs (a, b),
``s0 += a + s1; s1 += b + s0`` (mod 2**32), cumulative from the header through every frame,
covering each frame's first 8 header bytes and its page.  The magic's low bit says whether the
words are read big-endian (1) or little-endian (0).

Speed comes from linearity.  One pair step is ``s -> M·s + (a, a + b)`` with
``M = [[1, 1], [1, 2]]``, so after a frame of K pairs ``s_after = A·s_before + c`` where
``A = M**K`` and ``c`` is a fixed linear function of the frame's words whose coefficients
depend only on the page size.  We compute ``c`` for a block of frames with one uint32 matrix
product (wrapping mod 2**32 is exactly the arithmetic we need) and chain the states across
the block with a log-step prefix scan, so no Python code runs per word.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from functools import cache

import numpy as np
import numpy.typing as npt

from replicad.errors import WalError
from replicad.position import WalPosition

WAL_HEADER_SIZE = 32
FRAME_HEADER_SIZE = 24
WAL_MAGIC_LE = 0x377F0682
WAL_MAGIC_BE = 0x377F0683
WAL_FORMAT_VERSION = 3007000

_MIN_PAGE_SIZE = 512
_MAX_PAGE_SIZE = 65536
_MASK = 0xFFFFFFFF
_HEADER = struct.Struct(">8I")
_CHECKSUMMED_HEADER_BYTES = 24
#: Bytes of WAL verified per matrix product.  The product reads the caller's buffer in place,
#: so blocks cost no large temporaries; bigger blocks amortise numpy's per-call overhead, and
#: the bound limits the work wasted on frames past the end of the log (throughput flattens
#: out from about 1 MiB on the reference machine; see docs/benchmarks.md).
_BLOCK_BYTES = 1024 * 1024
_MAX_BLOCK_FRAMES = 1024

U32Array = npt.NDArray[np.uint32]
_Matrix = tuple[int, int, int, int]  # 2x2 row-major, entries mod 2**32


@dataclass(frozen=True, slots=True)
class WalHeader:
    """The 32-byte header of a ``-wal`` file: page size, salts and the checksum seed."""

    big_endian_checksum: bool
    page_size: int
    checkpoint_seq: int
    salt1: int
    salt2: int
    checksum1: int
    checksum2: int

    @property
    def frame_size(self) -> int:
        """Bytes per frame: the 24-byte frame header plus one page."""
        return FRAME_HEADER_SIZE + self.page_size

    def initial_position(self) -> WalPosition:
        """The position of this generation's first frame, seeded with the header checksum."""
        return WalPosition(
            salt1=self.salt1,
            salt2=self.salt2,
            offset=WAL_HEADER_SIZE,
            checksum1=self.checksum1,
            checksum2=self.checksum2,
        )


@dataclass(frozen=True, slots=True)
class WalFrame:
    """One page written by a committed transaction.

    `data` is a zero-copy slice of the buffer given to :func:`scan_frames`: copy it (or keep
    that buffer unchanged) for as long as the frame is used.
    """

    pgno: int
    offset: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class WalTransaction:
    """The frames of one committed transaction, in WAL order, ending with its commit frame."""

    frames: list[WalFrame]
    db_pages: int
    end: WalPosition


class StopReason(Enum):
    """Why :func:`scan_frames` stopped after the last valid frame."""

    END_OF_DATA = "end of data"  # the buffer ended exactly at a frame boundary
    PARTIAL_FRAME = "partial frame"  # the buffer ended inside a frame (torn or still being read)
    SALT_MISMATCH = "salt mismatch"  # the next frame belongs to an older generation
    #: The next frame breaks the checksum chain (torn, corrupt or stale), or names page 0,
    #: which SQLite rejects too and never writes: either way the frame is not part of the log.
    CHECKSUM_MISMATCH = "checksum mismatch"


@dataclass(frozen=True, slots=True)
class WalScan:
    """What :func:`scan_frames` found in one buffer."""

    transactions: list[WalTransaction]
    end: WalPosition
    uncommitted_frames: int
    stop_reason: StopReason


def parse_wal_header(data: bytes | memoryview) -> WalHeader:
    """Parse and verify the first 32 bytes of a ``-wal`` file.

    Raises `WalError` if there are fewer than 32 bytes, or the magic, format version, page
    size or header checksum is wrong; the message says which.
    """
    raw = _byte_view(data)
    if len(raw) < WAL_HEADER_SIZE:
        raise WalError(
            f"WAL header is {len(raw)} bytes, need {WAL_HEADER_SIZE}",
            hint="SQLite has not written the -wal file yet, or a checkpoint truncated it; "
            "read it again after the next write",
        )
    magic, version, page_size, seq, salt1, salt2, sum1, sum2 = _HEADER.unpack(raw[:WAL_HEADER_SIZE])
    _check_header_fields(magic, version, page_size)
    big_endian = bool(magic & 1)
    if _header_checksum(raw, big_endian=big_endian) != (sum1, sum2):
        raise WalError(
            "WAL header checksum mismatch",
            hint="the header is being rewritten (a WAL restart) or is corrupt; read it again, "
            "and if it persists the -wal file is damaged",
        )
    return WalHeader(big_endian, page_size, seq, salt1, salt2, sum1, sum2)


def scan_frames(header: WalHeader, buf: bytes | memoryview, start: WalPosition) -> WalScan:
    """Verify the frames in `buf` and return the committed transactions they hold.

    `buf` holds the ``-wal`` bytes from file offset `start.offset` (a frame boundary of the
    generation `header` describes); `start.checksum1/2` is the running checksum before that
    frame.  Raises `ValueError` if `start` is not a frame boundary of this generation.  Any
    *content* of `buf` is accepted: the first frame with wrong salts, page number 0 or a
    broken checksum chain, or a partial frame at the end, ends the log, as in SQLite.

    Only transactions up to the last valid commit frame are returned.  Valid frames after it
    (a transaction still being written, rolled back, or cut off by the end of `buf`) are only
    counted in `uncommitted_frames`.  Contract for reading in bounded chunks: pass the next
    chunk starting at `scan.end`.  A transaction that straddles the end of a chunk is not
    returned; reading again from `scan.end` with more data returns it whole.  `scan.end` is
    `start` when no transaction was found: if the log did not end there (`stop_reason` is
    END_OF_DATA or PARTIAL_FRAME and `uncommitted_frames` > 0 or the buffer was full), one
    transaction is larger than the chunk and the caller must read a larger one.
    """
    run = verify_frames(header, buf, start)
    fields, reason = run.fields, run.stop_reason
    commits = np.flatnonzero(fields[:, 1]).tolist()
    if not commits:
        return WalScan([], start, len(fields), reason)
    transactions = _transactions(_byte_view(buf), header, start, fields, commits)
    return WalScan(transactions, transactions[-1].end, len(fields) - commits[-1] - 1, reason)


@dataclass(frozen=True, slots=True)
class FrameRun:
    """The valid frames at the start of a buffer, committed or not (see `verify_frames`)."""

    #: (n, 6) uint32 header words of each valid frame: page number, database size after a
    #: commit (0 otherwise), salt-1, salt-2, checksum-1, checksum-2.
    fields: U32Array
    #: Offset in the file of the first frame.
    offset: int
    frame_size: int
    stop_reason: StopReason

    def __len__(self) -> int:
        return len(self.fields)

    def position_after(self, index: int, header: WalHeader) -> WalPosition:
        """The position (offset and running checksum) right after frame `index`."""
        _, _, _, _, checksum1, checksum2 = self.fields[index].tolist()
        return WalPosition(
            salt1=header.salt1,
            salt2=header.salt2,
            offset=self.offset + (index + 1) * self.frame_size,
            checksum1=checksum1,
            checksum2=checksum2,
        )

    def first_commit(self) -> int | None:
        """Index of the first commit frame, or None."""
        commits = np.flatnonzero(self.fields[:, 1])
        return int(commits[0]) if commits.size else None


def verify_frames(header: WalHeader, buf: bytes | memoryview, start: WalPosition) -> FrameRun:
    """Verify the frames in `buf` (from `start`, as for `scan_frames`) without grouping them.

    Unlike `scan_frames` this reports every valid frame, committed or not, so a caller can read a
    transaction too large for one buffer in pieces: continue from `position_after(len - 1)`.
    """
    _check_start(header, start)
    raw = _byte_view(buf)
    whole_frames = len(raw) // header.frame_size
    fields, reason = _verify(raw, header, start, whole_frames)
    if reason is None:
        partial = len(raw) > whole_frames * header.frame_size
        reason = StopReason.PARTIAL_FRAME if partial else StopReason.END_OF_DATA
    return FrameRun(fields, start.offset, header.frame_size, reason)


def frame_checksums(
    buf: bytes | memoryview,
    *,
    page_size: int,
    big_endian: bool,
    initial: tuple[int, int],
    count: int,
) -> U32Array:
    """The running checksum after each of `count` consecutive frames starting at `buf[0]`.

    Returns a ``(count, 2)`` uint32 array.  Stored salts and checksums in `buf` are ignored
    (they are not checksummed).  Raises `ValueError` for a bad page size, a negative count or
    a buffer shorter than `count` frames.
    """
    _check_page_size(page_size)
    raw = _byte_view(buf)
    tables = _tables(page_size)
    if count < 0 or len(raw) < count * tables.frame_size:
        raise ValueError(f"buffer of {len(raw)} bytes does not hold {count} frames")
    dtype = ">u4" if big_endian else "<u4"
    state = _state(*initial)
    blocks = [np.empty((0, 2), dtype=np.uint32)]
    for first, n in _blocks(count, tables.block_frames):
        sums = _block_checksums(_frame_words(raw, first, n, tables, dtype), state, tables)
        blocks.append(sums)
        state = sums[-1]
    return np.concatenate(blocks)


# --- header --------------------------------------------------------------------------------


def _check_header_fields(magic: int, version: int, page_size: int) -> None:
    if magic not in (WAL_MAGIC_LE, WAL_MAGIC_BE):
        raise WalError(
            f"bad WAL magic 0x{magic:08x}",
            hint="this is not a SQLite -wal file, or its header is corrupt",
        )
    if version != WAL_FORMAT_VERSION:
        raise WalError(
            f"unsupported WAL format version {version} (expected {WAL_FORMAT_VERSION})",
            hint="the -wal file was written by an incompatible SQLite, or is corrupt",
        )
    if not _valid_page_size(page_size):
        raise WalError(
            f"bad WAL page size {page_size} (expected a power of two from 512 to 65536)",
            hint="the -wal header is corrupt",
        )


def _header_checksum(raw: memoryview, *, big_endian: bool) -> tuple[int, int]:
    words = struct.unpack(">6I" if big_endian else "<6I", raw[:_CHECKSUMMED_HEADER_BYTES])
    s0 = s1 = 0
    for a, b in zip(words[0::2], words[1::2], strict=True):
        s0 = (s0 + a + s1) & _MASK
        s1 = (s1 + b + s0) & _MASK
    return s0, s1


def _valid_page_size(page_size: int) -> bool:
    power_of_two = page_size & (page_size - 1) == 0
    return power_of_two and _MIN_PAGE_SIZE <= page_size <= _MAX_PAGE_SIZE


def _check_page_size(page_size: int) -> None:
    if not _valid_page_size(page_size):
        raise ValueError(f"page size {page_size} is not a power of two from 512 to 65536")


# --- the fast checksum ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Tables:
    """What the fast checksum needs for one page size, computed once and cached."""

    frame_size: int
    words_per_frame: int
    block_frames: int
    #: (words_per_frame, 2): how each word of a frame adds to (s0, s1) after the frame.
    coefficients: U32Array
    #: Entry k is the transpose of A**(2**k), A = M**pairs: carries a state over 2**k frames.
    jumps: tuple[U32Array, ...]


@cache
def _tables(page_size: int) -> _Tables:
    """Coefficients, block size and jump matrices for one page size (a few ms for 64 KiB)."""
    frame_size = FRAME_HEADER_SIZE + page_size
    words = frame_size // 4
    # Checksummed: frame-header words 0-1 (page number, db size), then the page from word 6.
    # Words 2-5 (salts, stored checksum) keep a zero coefficient, so whole frames can be fed
    # to the product straight from the buffer.
    pairs = 1 + page_size // 8
    a_rows = np.r_[0, FRAME_HEADER_SIZE // 4 : words : 2]
    # Pair j is followed by pairs-1-j more steps, so its (a, a + b) is multiplied by
    # P = M**(pairs-1-j): a contributes P·(1, 1) (row sums), b contributes P's column 1.
    powers = _matrix_powers(pairs)
    remaining = np.array(powers[pairs - 1 :: -1], dtype=np.uint64)
    coefficients = np.zeros((words, 2), dtype=np.uint64)
    coefficients[a_rows, 0] = remaining[:, 0] + remaining[:, 1]
    coefficients[a_rows, 1] = remaining[:, 2] + remaining[:, 3]
    coefficients[a_rows + 1, 0] = remaining[:, 1]
    coefficients[a_rows + 1, 1] = remaining[:, 3]
    block_frames = max(1, min(_MAX_BLOCK_FRAMES, _BLOCK_BYTES // frame_size))
    return _Tables(
        frame_size=frame_size,
        words_per_frame=words,
        block_frames=block_frames,
        coefficients=(coefficients & _MASK).astype(np.uint32),
        jumps=_jump_table(powers[pairs], block_frames),
    )


def _matrix_powers(n: int) -> list[_Matrix]:
    """[M**0, M**1, ..., M**n] mod 2**32, M = [[1, 1], [1, 2]]: one checksum pair step."""
    powers: list[_Matrix] = [(1, 0, 0, 1)]
    for _ in range(n):
        powers.append(_mat_mul(powers[-1], (1, 1, 1, 2)))
    return powers


def _jump_table(step: _Matrix, block_frames: int) -> tuple[U32Array, ...]:
    """Transposed A**1, A**2, A**4, ...: every span the prefix scan of one block uses."""
    jumps = []
    power, span = step, 1
    while True:
        m00, m01, m10, m11 = power
        jumps.append(np.array([[m00, m10], [m01, m11]], dtype=np.uint32))
        span *= 2
        if span >= block_frames:
            return tuple(jumps)
        power = _mat_mul(power, power)


def _mat_mul(x: _Matrix, y: _Matrix) -> _Matrix:
    return (
        (x[0] * y[0] + x[1] * y[2]) & _MASK,
        (x[0] * y[1] + x[1] * y[3]) & _MASK,
        (x[2] * y[0] + x[3] * y[2]) & _MASK,
        (x[2] * y[1] + x[3] * y[3]) & _MASK,
    )


def _block_checksums(words: U32Array, state: U32Array, tables: _Tables) -> U32Array:
    """Running checksums after each frame of a block, from `state` before the block.

    uint32 products and sums wrap mod 2**32, which is the checksum's own arithmetic.
    """
    sums: U32Array = np.dot(words, tables.coefficients)
    # Fold the incoming state into frame 0, then prefix-scan: after the round with span d,
    # row i holds the state contributions of frames i-2d+1..i, carried forward to frame i.
    sums[0] += np.dot(state, tables.jumps[0])
    span = 1
    for jump in tables.jumps:
        if span >= len(sums):
            break
        sums[span:] += np.dot(sums[:-span], jump)
        span *= 2
    return sums


def _frame_words(raw: memoryview, first: int, count: int, tables: _Tables, dtype: str) -> U32Array:
    """Frames first..first+count-1 of `raw` as a (count, words) array, without copying."""
    view = np.frombuffer(
        raw,
        dtype=dtype,
        count=count * tables.words_per_frame,
        offset=first * tables.frame_size,
    )
    return view.reshape(count, tables.words_per_frame)


def _blocks(count: int, block_frames: int) -> list[tuple[int, int]]:
    return [(first, min(block_frames, count - first)) for first in range(0, count, block_frames)]


def _state(checksum1: int, checksum2: int) -> U32Array:
    return np.array([checksum1, checksum2], dtype=np.uint32)


# --- scanning ------------------------------------------------------------------------------


def _check_start(header: WalHeader, start: WalPosition) -> None:
    if not start.same_generation(header.salt1, header.salt2):
        raise ValueError("start position belongs to another WAL generation (salts differ)")
    if start.offset < WAL_HEADER_SIZE or (start.offset - WAL_HEADER_SIZE) % header.frame_size:
        raise ValueError(f"start offset {start.offset} is not a frame boundary")
    if not (0 <= start.checksum1 <= _MASK and 0 <= start.checksum2 <= _MASK):
        raise ValueError("start checksum is not a pair of 32-bit values")


def _verify(
    raw: memoryview, header: WalHeader, start: WalPosition, count: int
) -> tuple[U32Array, StopReason | None]:
    """Header fields (n, 6) of the leading valid frames, and why frame n is invalid.

    The reason is None when all `count` frames are valid.  Works block by block so that a
    short log followed by many stale frames costs only the blocks it touches.
    """
    sum_dtype = ">u4" if header.big_endian_checksum else "<u4"
    tables = _tables(header.page_size)
    state = _state(start.checksum1, start.checksum2)
    kept = [np.empty((0, 6), dtype=np.uint32)]
    for first, n in _blocks(count, tables.block_frames):
        fields = _frame_words(raw, first, n, tables, ">u4")[:, :6]
        words = _frame_words(raw, first, n, tables, sum_dtype)
        sums = _block_checksums(words, state, tables)
        invalid = _first_invalid(fields, sums, header)
        if invalid is not None:
            index, reason = invalid
            kept.append(fields[:index])
            return np.concatenate(kept), reason
        kept.append(fields)
        state = sums[-1]
    return np.concatenate(kept), None


def _first_invalid(
    fields: U32Array, sums: U32Array, header: WalHeader
) -> tuple[int, StopReason] | None:
    salt_ok = (fields[:, 2] == header.salt1) & (fields[:, 3] == header.salt2)
    page_ok = fields[:, 0] != 0
    sum_ok = (fields[:, 4] == sums[:, 0]) & (fields[:, 5] == sums[:, 1])
    valid = salt_ok & page_ok & sum_ok
    if valid.all():
        return None
    index = int(np.argmin(valid))
    # Salts first, as in SQLite's walDecodeFrame: a stale frame from an older generation is
    # reported as such even though its checksum also fails.
    if not salt_ok[index]:
        return index, StopReason.SALT_MISMATCH
    return index, StopReason.CHECKSUM_MISMATCH


def _transactions(
    raw: memoryview,
    header: WalHeader,
    start: WalPosition,
    fields: U32Array,
    commits: list[int],
) -> list[WalTransaction]:
    """Group the frames up to the last commit into transactions (Python only at this point)."""
    frame_size = header.frame_size
    frames = [
        WalFrame(pgno, start.offset + rel, raw[rel + FRAME_HEADER_SIZE : rel + frame_size])
        for pgno, rel in zip(
            fields[: commits[-1] + 1, 0].tolist(), range(0, len(raw), frame_size), strict=False
        )
    ]
    transactions = []
    begin = 0
    for commit in commits:
        db_pages, _, _, checksum1, checksum2 = fields[commit, 1:].tolist()
        end = WalPosition(
            salt1=header.salt1,
            salt2=header.salt2,
            offset=start.offset + (commit + 1) * frame_size,
            checksum1=checksum1,
            checksum2=checksum2,
        )
        transactions.append(WalTransaction(frames[begin : commit + 1], db_pages, end))
        begin = commit + 1
    return transactions


def _byte_view(data: bytes | memoryview) -> memoryview:
    """A flat byte view of `data`, so lengths and slices count bytes whatever its format."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")
