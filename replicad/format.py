"""Encode and decode the objects a replica holds (segments and snapshots): format v2.

Pure: no file or network I/O.  `ObjectWriter` writes to any sink with a `write(bytes)` method
and holds at most one block in memory; `ObjectDecoder` is fed chunks as they arrive and returns
events, so a multi-GB snapshot decodes in bounded memory.  The byte layout is specified in
`docs/format.md`; in short::

    header   128 bytes, fixed: magic, version, kind, codec, level, page size, TXID and
             commit-time ranges, database size, optional WAL position, the database's
             checksum before and after the object (v2; see `replicad.checksum`), CRC32
    blocks   each: raw length, stored length, CRC32 of the raw bytes, then the stored bytes;
             a block of raw length 0 ends the body
    trailer  every transaction (TXID, commit time, database size, page count, raw offset)
             and every block (object offset, raw offset)
    footer   32 bytes, fixed: object length, trailer length and CRC32, version, CRC32, end magic

The raw content (the blocks' bytes, decompressed and concatenated) is a stream of records: a
transaction record, then that many page records (page number, then exactly one page).
Records span block boundaries freely.

Errors: writer misuse raises `ValueError`; anything wrong with bytes being decoded raises
`replicad.errors.FormatError` and nothing else.  The decoder never returns a page from a block
whose checksum has not verified, but the object as a whole is only known to be intact once
the `EndEvent` (the verified trailer) has been returned.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from itertools import pairwise
from typing import Final, Protocol

import zstandard

from replicad.errors import FormatError
from replicad.position import (
    NO_CHECKSUM,
    ObjectKind,
    ObjectName,
    WalPosition,
    segment_name,
    snapshot_name,
)

FORMAT_VERSION: Final = 2
"""Major version written.  Bumped for every change older readers misread."""
READABLE_VERSIONS: Final = frozenset({1, 2})
"""Major versions this reader accepts: v1 objects carry no database checksums (no chain proof)."""
FORMAT_MINOR_VERSION: Final = 0
"""Minor version: informative; a minor change only adds what older readers can ignore."""

DEFAULT_BLOCK_SIZE: Final = 1 << 20
"""Raw bytes per block: big enough for zstd to compress well, small enough to bound memory."""
MAX_BLOCK_SIZE: Final = 16 << 20
"""Largest raw block a reader accepts, so a corrupt length cannot make it allocate gigabytes."""
DEFAULT_ZSTD_LEVEL: Final = 3

MAGIC: Final = b"\x89RPLCAD\n"
END_MAGIC: Final = b"\x89RPLEND\n"

# Little-endian throughout.  The header's first 80 bytes are fields, then reserved zeros, then
# the CRC32 of everything before it.
_HEADER_FIELDS = struct.Struct("<8sHHBBBBIIQQqqIIQIIQQ")
_VERSION = struct.Struct("<HH")
HEADER_SIZE: Final = 128
_HEADER_CRC_AT = HEADER_SIZE - 4
_BLOCK = struct.Struct("<III")  # raw length, stored length, CRC32 of the raw bytes
_TXN = struct.Struct("<QqII")  # txid, commit time ns, database pages, page count
_PGNO = struct.Struct("<I")
_CRC = struct.Struct("<I")
_TRAILER_HEAD = struct.Struct("<IIQ")  # transaction count, block count, raw length
_TRAILER_TXN_V1 = struct.Struct("<QqIIQ")  # a transaction record's fields and its raw offset
_TRAILER_TXN = struct.Struct("<QqIIQQ")  # v2: and the database checksum after it (0: none)
_TRAILER_BLOCK = struct.Struct("<QQ")  # object offset of the block header, raw offset
_FOOTER = struct.Struct("<QIIHHI8s")
FOOTER_SIZE: Final = _FOOTER.size
_FOOTER_CRC_AT = 20

_KIND_CODES: Final = {ObjectKind.SNAPSHOT: 1, ObjectKind.SEGMENT: 2}
_KINDS_BY_CODE: Final = {code: kind for kind, code in _KIND_CODES.items()}
_FLAG_POSITION = 0x01
_FLAG_CHECKSUMS = 0x02  # v2: the database checksum before and after are recorded

_U32 = 2**32 - 1
_U64 = 2**64 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_PAGE_SIZES: Final = frozenset(1 << n for n in range(9, 17))  # SQLite's: 512..65536
_MAX_LEVEL = 99


class Codec(IntEnum):
    """How each block's bytes are stored."""

    NONE = 0
    ZSTD = 1


_CODECS: Final = frozenset(Codec)


class SupportsWrite(Protocol):
    """Where an `ObjectWriter` puts its bytes: a file, a buffer, a multipart uploader."""

    def write(self, data: bytes, /) -> object:
        """Take all of `data`."""
        ...


@dataclass(frozen=True, slots=True)
class ObjectHeader:
    """What an object says about itself, readable from its first `HEADER_SIZE` bytes.

    `db_pages` and `position` describe the database and its WAL after `last_txid`; `position`
    is None when unknown (a snapshot taken from the database file alone, a compacted segment).
    Times are Unix nanoseconds of the first and last commit.  `pre_checksum` and
    `post_checksum` are the database's checksum (`replicad.checksum`) before the object applies
    and after its last transaction; None in v1 objects.  A snapshot's `pre_checksum` is 0 (it
    applies to nothing).
    """

    kind: ObjectKind
    page_size: int
    level: int
    first_txid: int
    last_txid: int
    min_time_ns: int
    max_time_ns: int
    db_pages: int
    position: WalPosition | None
    codec: Codec = Codec.ZSTD
    pre_checksum: int | None = None
    post_checksum: int | None = None

    @property
    def chained(self) -> bool:
        """True when the object records checksums, so it proves where it sits in a history."""
        return self.post_checksum is not None


@dataclass(frozen=True, slots=True)
class TxnInfo:
    """One transaction's boundary: its TXID, commit time, database size after it, page count."""

    txid: int
    commit_time_ns: int
    db_pages: int
    page_count: int


@dataclass(frozen=True, slots=True)
class Transaction:
    """A transaction with its pages, `(pgno, page bytes)` in the order they were written, and
    the database checksum after it (None in an object that records no checksums).
    """

    info: TxnInfo
    pages: list[tuple[int, bytes]]
    checksum: int | None = None


@dataclass(frozen=True, slots=True)
class BlockRef:
    """Where a block starts: its header's offset in the object, its first byte's raw offset."""

    object_offset: int
    raw_offset: int


@dataclass(frozen=True, slots=True)
class ObjectIndex:
    """The verified trailer: enough to fetch any transaction with one ranged read.

    `record_offsets[i]` is the raw offset of `transactions[i]`'s record; the block holding it
    is the last one in `blocks` whose `raw_offset` is not greater.
    """

    transactions: list[TxnInfo]
    record_offsets: list[int]
    blocks: list[BlockRef]
    raw_length: int
    object_length: int
    #: The database checksum after each transaction (v2, chained objects); None otherwise.
    checksums: list[int] | None = None

    def checksum_after(self, txid: int) -> int | None:
        """The database checksum after transaction `txid` of this object, if recorded."""
        if self.checksums is None:
            return None
        return self.checksums[txid - self.transactions[0].txid]


@dataclass(frozen=True, slots=True)
class PageEvent:
    """One page of transaction `txid`, from blocks whose checksums have verified."""

    txid: int
    pgno: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TxnStartEvent:
    """A transaction record: its `info.page_count` pages follow."""

    info: TxnInfo


@dataclass(frozen=True, slots=True)
class TxnEndEvent:
    """The last page of the transaction has been returned."""

    info: TxnInfo


@dataclass(frozen=True, slots=True)
class EndEvent:
    """The object is complete and its trailer agrees with everything returned before."""

    transactions: list[TxnInfo]
    #: The verified trailer, with each transaction's database checksum after it if recorded.
    index: ObjectIndex | None = dataclasses.field(default=None, compare=False)

    @property
    def checksums(self) -> list[int] | None:
        """The database checksum after each transaction, when the object records them."""
        return None if self.index is None else self.index.checksums


DecodeEvent = PageEvent | TxnStartEvent | TxnEndEvent | EndEvent


# ---------------------------------------------------------------------------------------------
# Header


def object_name(header: ObjectHeader) -> ObjectName:
    """The key an object with this header is stored under: the one place names are made."""
    pre, post = header.pre_checksum, header.post_checksum
    if header.kind is ObjectKind.SNAPSHOT:
        return snapshot_name(
            header.last_txid,
            header.max_time_ns // 1_000_000,
            post=NO_CHECKSUM if post is None else post,
        )
    return segment_name(
        level=header.level,
        first_txid=header.first_txid,
        last_txid=header.last_txid,
        min_time_ms=header.min_time_ns // 1_000_000,
        max_time_ms=header.max_time_ns // 1_000_000,
        pre=NO_CHECKSUM if pre is None else pre,
        post=NO_CHECKSUM if post is None else post,
    )


def encode_header(header: ObjectHeader) -> bytes:
    """The `HEADER_SIZE` bytes that start an object. Raises ValueError for an invalid header."""
    if problem := _header_problem(header):
        raise ValueError(f"invalid object header: {problem}")
    pos = header.position
    flags = (_FLAG_POSITION if pos else 0) | (_FLAG_CHECKSUMS if header.chained else 0)
    fields = _HEADER_FIELDS.pack(
        MAGIC,
        FORMAT_VERSION,
        FORMAT_MINOR_VERSION,
        _KIND_CODES[header.kind],
        Codec(header.codec),
        header.level,
        flags,
        header.page_size,
        header.db_pages,
        header.first_txid,
        header.last_txid,
        header.min_time_ns,
        header.max_time_ns,
        *((pos.salt1, pos.salt2, pos.offset, pos.checksum1, pos.checksum2) if pos else (0,) * 5),
        header.pre_checksum or 0,
        header.post_checksum or 0,
    )
    body = fields.ljust(_HEADER_CRC_AT, b"\0")
    return body + _CRC.pack(zlib.crc32(body))


def decode_header(data: bytes | memoryview) -> ObjectHeader:
    """Read the header from an object's first bytes (at least `HEADER_SIZE` of them)."""
    head = bytes(data[:HEADER_SIZE])
    _check_prefix(head)
    if len(head) < HEADER_SIZE:
        raise FormatError(
            f"truncated object: the header needs {HEADER_SIZE} bytes, got {len(head)}"
        )
    (crc,) = _CRC.unpack_from(head, _HEADER_CRC_AT)
    if zlib.crc32(head[:_HEADER_CRC_AT]) != crc:
        raise FormatError("header checksum mismatch: the object is corrupt")
    fields = _HEADER_FIELDS.unpack_from(head)
    major = fields[1]
    kind_code, codec, level, flags, page_size, db_pages, first, last, tmin, tmax = fields[3:13]
    salt1, salt2, offset, ck1, ck2, pre, post = fields[13:]
    kind = _KINDS_BY_CODE.get(kind_code)
    if kind is None:
        raise FormatError(f"unknown object kind {kind_code}; upgrade replicad")
    if codec not in _CODECS:
        raise FormatError(f"unknown codec {codec}; upgrade replicad")
    known = _FLAG_POSITION | (_FLAG_CHECKSUMS if major >= 2 else 0)
    if flags & ~known:
        raise FormatError(f"unknown header flags {flags:#04x}; upgrade replicad")
    position = None
    if flags & _FLAG_POSITION:
        position = WalPosition(salt1, salt2, offset, ck1, ck2)
    elif salt1 or salt2 or offset or ck1 or ck2:
        raise FormatError("bad header: WAL position fields are set but flagged absent")
    checksums: tuple[int | None, int | None] = (None, None)
    if flags & _FLAG_CHECKSUMS:
        checksums = (pre, post)
    elif pre or post:
        raise FormatError("bad header: checksum fields are set but flagged absent")
    header = ObjectHeader(
        kind,
        page_size,
        level,
        first,
        last,
        tmin,
        tmax,
        db_pages,
        position,
        Codec(codec),
        *checksums,
    )
    if problem := _header_problem(header):
        raise FormatError(f"bad header: {problem}")
    return header


def _check_prefix(head: bytes) -> None:
    """Refuse foreign data and newer versions from as few bytes as are available."""
    if not head:
        raise FormatError("not a replicad object: it is empty")
    if head[: len(MAGIC)] != MAGIC[: len(head)]:
        raise FormatError(f"not a replicad object: it starts with {head[:8]!r}")
    if len(head) >= len(MAGIC) + _VERSION.size:
        major, _ = _VERSION.unpack_from(head, len(MAGIC))
        _check_major(major)


def _check_major(major: int) -> None:
    if major > FORMAT_VERSION:
        raise FormatError(
            f"object written by a newer replicad (format v{major}); upgrade",
            hint=f"this replicad reads format v{FORMAT_VERSION} and older",
        )
    if major not in READABLE_VERSIONS:
        raise FormatError(f"unknown object format version {major}")


def _header_problem(h: ObjectHeader) -> str | None:
    """What is wrong with a header, or None.  Shared by the writer and the decoder."""
    if h.kind not in _KIND_CODES:
        return f"unknown kind {h.kind!r}"
    if h.codec not in _CODECS:
        return f"unknown codec {h.codec!r}"
    if h.page_size not in _PAGE_SIZES:
        return f"page size {h.page_size} is not a power of two in 512..65536"
    if not 0 <= h.level <= _MAX_LEVEL:
        return f"level {h.level} out of range 0..{_MAX_LEVEL}"
    if not 1 <= h.first_txid <= h.last_txid <= _U64:
        return f"TXID range {h.first_txid}..{h.last_txid} is empty, reversed or out of range"
    if not _I64_MIN <= h.min_time_ns <= h.max_time_ns <= _I64_MAX:
        return f"time range {h.min_time_ns}..{h.max_time_ns} ns is reversed or out of range"
    if not 1 <= h.db_pages <= _U32:
        return f"database size {h.db_pages} pages out of range 1..2**32-1"
    if h.position is not None and (problem := _position_problem(h.position)):
        return problem
    if problem := _checksum_problem(h):
        return problem
    if h.kind is ObjectKind.SNAPSHOT:
        if h.level != 0:
            return f"a snapshot has level 0, not {h.level}"
        if h.first_txid != h.last_txid or h.min_time_ns != h.max_time_ns:
            return "a snapshot holds one transaction: its TXID and time ranges are single values"
    return None


def _checksum_problem(h: ObjectHeader) -> str | None:
    if (h.pre_checksum is None) != (h.post_checksum is None):
        return "the checksums before and after are recorded together or not at all"
    if not all(0 <= c <= _U64 for c in (h.pre_checksum or 0, h.post_checksum or 0)):
        return "a database checksum is out of range"
    if h.kind is ObjectKind.SNAPSHOT and h.pre_checksum:
        return "a snapshot applies to nothing: its checksum before is 0"
    return None


def _position_problem(p: WalPosition) -> str | None:
    words = (p.salt1, p.salt2, p.checksum1, p.checksum2)
    if not all(0 <= w <= _U32 for w in words) or not 0 <= p.offset <= _U64:
        return f"WAL position {p} has a field out of range"
    return None


# ---------------------------------------------------------------------------------------------
# Transaction sequence rules, shared by the writer and the decoder


class _Sequence:
    """Checks that transaction records follow the header, and remembers them for the trailer.

    Each method returns a description of the first broken rule, or None.
    """

    def __init__(self, header: ObjectHeader) -> None:
        self.header = header
        self.transactions: list[TxnInfo] = []
        self.record_offsets: list[int] = []
        self.pages_left = 0
        self._snapshot = header.kind is ObjectKind.SNAPSHOT
        self._next_pgno = 1

    def start(self, info: TxnInfo, raw_offset: int) -> str | None:
        """A transaction record begins at `raw_offset`."""
        h = self.header
        if self.pages_left:
            last = self.transactions[-1]
            return f"transaction {last.txid} still expects {self.pages_left} pages"
        prev = self.transactions[-1] if self.transactions else None
        expected_txid = prev.txid + 1 if prev else h.first_txid
        if info.txid != expected_txid:
            return f"transaction {info.txid} where {expected_txid} should come next"
        if info.txid > h.last_txid:
            return f"transaction {info.txid} is past the object's last TXID {h.last_txid}"
        if prev is None and info.commit_time_ns != h.min_time_ns:
            return f"first commit time {info.commit_time_ns} is not min_time_ns {h.min_time_ns}"
        earliest = prev.commit_time_ns if prev else h.min_time_ns
        if not earliest <= info.commit_time_ns <= h.max_time_ns:
            return (
                f"transaction {info.txid} commit time {info.commit_time_ns} is outside "
                f"{earliest}..{h.max_time_ns} (commit times never decrease)"
            )
        if not 1 <= info.db_pages <= _U32:
            return f"transaction {info.txid} database size {info.db_pages} out of range"
        if not 0 <= info.page_count <= _U32:
            return f"transaction {info.txid} page count {info.page_count} out of range"
        if self._snapshot and info.page_count != info.db_pages:
            return f"a snapshot holds all {info.db_pages} pages, not {info.page_count}"
        self.transactions.append(info)
        self.record_offsets.append(raw_offset)
        self.pages_left = info.page_count
        return None

    def page(self, pgno: int) -> str | None:
        """A page record of the current transaction."""
        if not self.pages_left:
            return f"page {pgno} outside a transaction"
        if self._snapshot:
            if pgno != self._next_pgno:
                return f"snapshot page {pgno} where {self._next_pgno} should come next"
            self._next_pgno += 1
        elif not 1 <= pgno <= _U32:
            return f"page number {pgno} out of range 1..2**32-1"
        self.pages_left -= 1
        return None

    def finish(self) -> str | None:
        """The last record has been seen."""
        h = self.header
        if self.pages_left:
            last = self.transactions[-1]
            return f"transaction {last.txid} is missing {self.pages_left} pages"
        if not self.transactions:
            return f"no transactions, but the header says {h.first_txid}..{h.last_txid}"
        last = self.transactions[-1]
        if last.txid != h.last_txid:
            return f"transactions end at {last.txid}, but the header says {h.last_txid}"
        if last.commit_time_ns != h.max_time_ns:
            return f"last commit time {last.commit_time_ns} is not max_time_ns {h.max_time_ns}"
        if last.db_pages != h.db_pages:
            return f"last database size {last.db_pages} is not the header's {h.db_pages}"
        return None


# ---------------------------------------------------------------------------------------------
# Writing


class ObjectWriter:
    """Streams one object to `sink`: the header at once, then each block as it fills.

    Call `begin_transaction` then `add_page` `page_count` times, for each transaction in
    TXID order, then `finish`.  Memory is bounded by `block_size` plus one page.  Misuse
    raises ValueError before anything changes, so the rejected call can be corrected.
    """

    def __init__(
        self,
        sink: SupportsWrite,
        header: ObjectHeader,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
    ) -> None:
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size {block_size} out of range 1..{MAX_BLOCK_SIZE}")
        encoded_header = encode_header(header)
        self._sink = sink
        self._header = header
        self._block_size = block_size
        self._compressor = (
            zstandard.ZstdCompressor(level=zstd_level) if header.codec == Codec.ZSTD else None
        )
        self._sequence = _Sequence(header)
        self._checksums: list[int] = []
        self._pending = bytearray()  # raw content not yet in a block
        self._raw_written = 0  # raw content already in blocks
        self._blocks: list[BlockRef] = []
        self._written = 0
        self._finished = False
        self._write(encoded_header)

    def begin_transaction(
        self,
        txid: int,
        commit_time_ns: int,
        db_pages: int,
        page_count: int,
        checksum: int | None = None,
    ) -> None:
        """Start the record of transaction `txid`; exactly `page_count` pages must follow.

        `checksum`: the database checksum after it, required when the header records
        checksums (the last transaction's must be the header's `post_checksum`).
        """
        self._check_open()
        info = TxnInfo(txid, commit_time_ns, db_pages, page_count)
        if self._header.chained != (checksum is not None):
            raise ValueError("a transaction's checksum goes with a header that records them")
        if checksum is not None and not 0 <= checksum <= _U64:
            raise ValueError(f"checksum {checksum} out of range")
        if problem := self._sequence.start(info, self._raw_written + len(self._pending)):
            raise ValueError(problem)
        self._checksums.append(checksum or 0)
        self._pending += _TXN.pack(txid, commit_time_ns, db_pages, page_count)
        self._flush_full_blocks()

    def add_page(self, pgno: int, data: bytes | memoryview) -> None:
        """Add one page (exactly `page_size` bytes) to the current transaction."""
        self._check_open()
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size != self._header.page_size:
            raise ValueError(f"page {pgno} is {size} bytes, not {self._header.page_size}")
        if problem := self._sequence.page(pgno):
            raise ValueError(problem)
        self._pending += _PGNO.pack(pgno)
        self._pending += data
        self._flush_full_blocks()

    def settle_checksum(self, checksum: int) -> bytes:
        """Record the database checksum after the last transaction, learnt only once its pages
        were written (a snapshot hashes them as it goes), as that transaction's and the
        header's `post_checksum`.  Returns the header to write again at the object's start,
        so the sink must be seekable.  The header began with a placeholder checksum.
        """
        self._check_open()
        if not self._header.chained or not self._checksums:
            raise ValueError("settle_checksum needs a header that records checksums")
        self._header = dataclasses.replace(self._header, post_checksum=checksum)
        self._checksums[-1] = checksum
        return encode_header(self._header)

    def finish(self) -> int:
        """Write the last blocks, the end marker, trailer and footer; return the object's size."""
        self._check_open()
        if problem := self._sequence.finish():
            raise ValueError(problem)
        if self._header.chained and self._checksums[-1] != self._header.post_checksum:
            raise ValueError("the last transaction's checksum is not the header's post_checksum")
        self._finished = True
        while self._pending:
            self._write_block(self._take_block())
        self._write(_BLOCK.pack(0, 0, 0))
        trailer = _encode_trailer(self._sequence, self._checksums, self._blocks, self._raw_written)
        self._write(trailer)
        object_length = self._written + FOOTER_SIZE
        self._write(_encode_footer(object_length, trailer))
        return self._written

    def _check_open(self) -> None:
        if self._finished:
            raise ValueError("the object is already finished")

    def _flush_full_blocks(self) -> None:
        while len(self._pending) >= self._block_size:
            self._write_block(self._take_block())

    def _take_block(self) -> bytes:
        raw = bytes(self._pending[: self._block_size])
        del self._pending[: self._block_size]
        return raw

    def _write_block(self, raw: bytes) -> None:
        self._blocks.append(BlockRef(self._written, self._raw_written))
        self._raw_written += len(raw)
        stored = raw
        if self._compressor is not None:
            compressed = self._compressor.compress(raw)
            # A block that does not shrink is stored as is: equal lengths mark it.
            if len(compressed) < len(raw):
                stored = compressed
        self._write(_BLOCK.pack(len(raw), len(stored), zlib.crc32(raw)))
        self._write(stored)

    def _write(self, data: bytes) -> None:
        self._sink.write(data)
        self._written += len(data)


def _encode_trailer(
    sequence: _Sequence, checksums: list[int], blocks: list[BlockRef], raw_length: int
) -> bytes:
    txns = sequence.transactions
    if len(txns) > _U32 or len(blocks) > _U32:
        raise ValueError("too many transactions or blocks for one object")
    parts = [_TRAILER_HEAD.pack(len(txns), len(blocks), raw_length)]
    parts += (
        _TRAILER_TXN.pack(t.txid, t.commit_time_ns, t.db_pages, t.page_count, offset, checksum)
        for t, offset, checksum in zip(txns, sequence.record_offsets, checksums, strict=True)
    )
    parts += (_TRAILER_BLOCK.pack(b.object_offset, b.raw_offset) for b in blocks)
    return b"".join(parts)


def _encode_footer(object_length: int, trailer: bytes) -> bytes:
    fields = _FOOTER.pack(
        object_length,
        len(trailer),
        zlib.crc32(trailer),
        FORMAT_VERSION,
        FORMAT_MINOR_VERSION,
        0,
        END_MAGIC,
    )
    crc = zlib.crc32(fields[:_FOOTER_CRC_AT])
    return fields[:_FOOTER_CRC_AT] + _CRC.pack(crc) + END_MAGIC


def encode_object(
    header: ObjectHeader,
    transactions: Iterable[Transaction],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
) -> bytes:
    """A whole object in memory: for segments and tests; stream snapshots with ObjectWriter."""
    chunks: list[bytes] = []
    writer = ObjectWriter(_ListSink(chunks), header, block_size=block_size, zstd_level=zstd_level)
    for txn in transactions:
        info = txn.info
        writer.begin_transaction(
            info.txid, info.commit_time_ns, info.db_pages, info.page_count, txn.checksum
        )
        for pgno, data in txn.pages:
            writer.add_page(pgno, data)
    writer.finish()
    return b"".join(chunks)


class _ListSink:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    def write(self, data: bytes, /) -> None:
        self._chunks.append(data)


# ---------------------------------------------------------------------------------------------
# Reading the trailer from the end


def trailer_span(tail: bytes | memoryview) -> int:
    """How many bytes at the end of an object `read_index` needs, from its last FOOTER_SIZE."""
    object_length, trailer_length, _, _ = _decode_footer(tail)
    if object_length < HEADER_SIZE + _BLOCK.size + trailer_length + FOOTER_SIZE:
        raise FormatError(f"bad footer: object length {object_length} is too small")
    return trailer_length + FOOTER_SIZE


def read_index(tail: bytes | memoryview) -> ObjectIndex:
    """The verified trailer, from an object's last `trailer_span` (or more) bytes."""
    span = trailer_span(tail)
    if len(tail) < span:
        raise FormatError(f"truncated object: the trailer needs the last {span} bytes")
    object_length, trailer_length, trailer_crc, major = _decode_footer(tail)
    entry_format = _TRAILER_TXN if major >= 2 else _TRAILER_TXN_V1
    start = len(tail) - span
    trailer = bytes(tail[start : start + trailer_length])
    if zlib.crc32(trailer) != trailer_crc:
        raise FormatError("trailer checksum mismatch: the object is corrupt")
    if trailer_length < _TRAILER_HEAD.size:
        raise FormatError(f"bad trailer: {trailer_length} bytes is too short")
    txn_count, block_count, raw_length = _TRAILER_HEAD.unpack_from(trailer)
    blocks_at = _TRAILER_HEAD.size + txn_count * entry_format.size
    if blocks_at + block_count * _TRAILER_BLOCK.size != trailer_length:
        raise FormatError(f"bad trailer: {trailer_length} bytes do not fit its counts")
    entries = list(entry_format.iter_unpack(trailer[_TRAILER_HEAD.size : blocks_at]))
    index = ObjectIndex(
        transactions=[TxnInfo(*entry[:4]) for entry in entries],
        record_offsets=[entry[4] for entry in entries],
        blocks=[BlockRef(*b) for b in _TRAILER_BLOCK.iter_unpack(trailer[blocks_at:])],
        raw_length=raw_length,
        object_length=object_length,
        checksums=[entry[5] for entry in entries] if major >= 2 else None,
    )
    if problem := _index_problem(index, trailer_length):
        raise FormatError(f"bad trailer: {problem}")
    return index


def read_trailer(tail: bytes | memoryview) -> list[TxnInfo]:
    """Every transaction in an object, from its last `trailer_span` (or more) bytes."""
    return read_index(tail).transactions


def _decode_footer(tail: bytes | memoryview) -> tuple[int, int, int, int]:
    """(object length, trailer length, trailer CRC, major version) from the last FOOTER_SIZE
    bytes.
    """
    if len(tail) < FOOTER_SIZE:
        raise FormatError(
            f"truncated object: the footer needs {FOOTER_SIZE} bytes, got {len(tail)}"
        )
    footer = bytes(tail[len(tail) - FOOTER_SIZE :])
    object_length, trailer_length, trailer_crc, major, _, crc, end_magic = _FOOTER.unpack(footer)
    if end_magic != END_MAGIC:
        raise FormatError("not a replicad object, or truncated: no footer at its end")
    _check_major(major)
    if zlib.crc32(footer[:_FOOTER_CRC_AT]) != crc:
        raise FormatError("footer checksum mismatch: the object is corrupt")
    return object_length, trailer_length, trailer_crc, major


def _index_problem(index: ObjectIndex, trailer_length: int) -> str | None:
    """Inconsistencies within a trailer whose checksum matched (a writer bug, not bit rot)."""
    txns, offsets, blocks = index.transactions, index.record_offsets, index.blocks
    if not txns or not blocks:
        return "no transactions or no blocks"
    if any(b.txid != a.txid + 1 for a, b in pairwise(txns)):
        return "TXIDs are not consecutive"
    if any(b.commit_time_ns < a.commit_time_ns for a, b in pairwise(txns)):
        return "commit times decrease"
    if offsets[0] != 0 or not _increasing(offsets) or offsets[-1] >= index.raw_length:
        return "record offsets are out of order or out of the raw content"
    body_end = index.object_length - FOOTER_SIZE - trailer_length - _BLOCK.size
    first = blocks[0]
    if first.object_offset != HEADER_SIZE or first.raw_offset != 0:
        return "the first block is not right after the header"
    if not _increasing([b.object_offset for b in blocks]) or blocks[-1].object_offset >= body_end:
        return "block offsets are out of order or out of the body"
    if not _increasing([b.raw_offset for b in blocks]) or blocks[-1].raw_offset >= index.raw_length:
        return "block raw offsets are out of order or out of the raw content"
    return None


def _increasing(values: list[int]) -> bool:
    return all(a < b for a, b in pairwise(values))


# ---------------------------------------------------------------------------------------------
# Streaming decoder


class _Part(IntEnum):
    """What the decoder expects next."""

    HEADER = 0
    BLOCK_HEADER = 1
    BLOCK_DATA = 2
    TRAILER_HEAD = 3
    TRAILER_REST = 4
    DONE = 5


_PART_NAMES: Final = {
    _Part.HEADER: "the header",
    _Part.BLOCK_HEADER: "a block header",
    _Part.BLOCK_DATA: "a block",
    _Part.TRAILER_HEAD: "the trailer",
    _Part.TRAILER_REST: "the trailer or footer",
}


class ObjectDecoder:
    """Decodes one object from chunks fed in order, in memory bounded by one block.

    `feed` returns the events the bytes so far make available; `close` says the object has
    ended.  Both raise FormatError for anything malformed, after which the decoder only
    raises that error again.  Pages come only from blocks whose CRC32 verified; the `EndEvent`
    confirms that the trailer agrees with every record returned.
    """

    def __init__(self, *, expected: ObjectName | None = None) -> None:
        self.header: ObjectHeader | None = None
        #: The verified trailer, once the object has ended.
        self.index: ObjectIndex | None = None
        self._expected = expected
        self._input = bytearray()
        self._consumed = 0  # object offset of self._input[0]
        self._part = _Part.HEADER
        self._need = HEADER_SIZE
        self._block = (0, 0, 0)  # raw length, stored length, CRC of the block being read
        self._records: _RecordReader | None = None
        self._decompressor = zstandard.ZstdDecompressor()
        self._blocks: list[BlockRef] = []
        self._trailer_head = b""
        self._major = FORMAT_VERSION
        self._error: FormatError | None = None

    def feed(self, chunk: bytes | memoryview) -> list[DecodeEvent]:
        """Take the next bytes of the object; return the events they complete, in order."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(chunk)
        except FormatError as exc:
            self._error = exc
            raise

    def close(self) -> None:
        """The object has ended: raise FormatError unless it was complete."""
        if self._error is not None:
            raise self._error
        if self._part is _Part.DONE:
            return
        received = self._consumed + len(self._input)
        if received == 0:
            self._error = FormatError("not a replicad object: it is empty")
        else:
            self._error = FormatError(
                f"truncated object: it ends after {received} bytes, "
                f"inside {_PART_NAMES[self._part]}"
            )
        raise self._error

    def _feed(self, chunk: bytes | memoryview) -> list[DecodeEvent]:
        events: list[DecodeEvent] = []
        self._input += chunk
        if self._part is _Part.HEADER and chunk:
            _check_prefix(bytes(self._input[:HEADER_SIZE]))
        while len(self._input) >= self._need:
            if self._part is _Part.DONE:
                raise FormatError(f"trailing bytes after the end of the object at {self._consumed}")
            with memoryview(self._input) as view:
                self._take(view[: self._need], events)
            del self._input[: self._need]
            self._consumed += self._need
            self._need = self._next_need()
        return events

    def _take(self, data: memoryview, events: list[DecodeEvent]) -> None:
        """Handle the `self._need` bytes of the current part and move to the next part."""
        match self._part:
            case _Part.HEADER:
                self._take_header(data)
            case _Part.BLOCK_HEADER:
                self._take_block_header(data)
            case _Part.BLOCK_DATA:
                assert self._records is not None
                self._records.feed(self._decode_block(data), events)
                self._part = _Part.BLOCK_HEADER
            case _Part.TRAILER_HEAD:
                self._take_trailer_head(bytes(data))
            case _Part.TRAILER_REST:
                events.append(self._take_trailer(bytes(data)))

    def _next_need(self) -> int:
        match self._part:
            case _Part.BLOCK_HEADER:
                return _BLOCK.size
            case _Part.BLOCK_DATA:
                return self._block[1]
            case _Part.TRAILER_HEAD:
                return _TRAILER_HEAD.size
            case _Part.TRAILER_REST:
                return self._trailer_rest_length()
            case _:
                return 1  # DONE: any further byte is an error

    def _take_header(self, data: memoryview) -> None:
        header = decode_header(data)
        (self._major,) = _VERSION.unpack_from(data, len(MAGIC))[:1]
        if self._expected is not None:
            _check_expected(header, self._expected)
        self.header = header
        self._records = _RecordReader(header)
        self._part = _Part.BLOCK_HEADER

    def _take_block_header(self, data: memoryview) -> None:
        assert self.header is not None
        assert self._records is not None
        raw_length, stored_length, crc = _BLOCK.unpack(data)
        where = f"block at byte {self._consumed}"
        if raw_length == 0:
            if stored_length or crc:
                raise FormatError(f"{where}: malformed end-of-body marker")
            self._records.finish()
            self._part = _Part.TRAILER_HEAD
            return
        if raw_length > MAX_BLOCK_SIZE:
            raise FormatError(f"{where}: raw length {raw_length} exceeds {MAX_BLOCK_SIZE}")
        if stored_length == 0 or stored_length > raw_length:
            raise FormatError(f"{where}: stored length {stored_length} for {raw_length} bytes")
        if self.header.codec is Codec.NONE and stored_length != raw_length:
            raise FormatError(f"{where}: an uncompressed block's stored length differs")
        self._blocks.append(BlockRef(self._consumed, self._records.raw_length))
        self._block = (raw_length, stored_length, crc)
        self._part = _Part.BLOCK_DATA

    def _decode_block(self, stored: memoryview) -> bytes:
        """The raw bytes of the block just read, verified against its CRC32."""
        raw_length, stored_length, crc = self._block
        where = f"block at byte {self._consumed - _BLOCK.size}"
        if stored_length == raw_length:
            raw = bytes(stored)
        else:
            try:
                if zstandard.frame_content_size(stored) != raw_length:
                    raise FormatError(f"{where}: zstd frame does not hold {raw_length} bytes")
                raw = self._decompressor.decompress(
                    stored, max_output_size=raw_length, allow_extra_data=False
                )
            except zstandard.ZstdError as exc:
                raise FormatError(f"{where}: cannot decompress: {exc}") from exc
            if len(raw) != raw_length:
                raise FormatError(f"{where}: decompressed to {len(raw)} bytes, not {raw_length}")
        if zlib.crc32(raw) != crc:
            raise FormatError(f"{where}: checksum mismatch: the object is corrupt")
        return raw

    def _take_trailer_head(self, data: bytes) -> None:
        assert self._records is not None
        txn_count, block_count, _ = _TRAILER_HEAD.unpack(data)
        seen = (len(self._records.sequence.transactions), len(self._blocks))
        if (txn_count, block_count) != seen:
            raise FormatError(
                f"trailer disagrees with body: it lists {txn_count} transactions in "
                f"{block_count} blocks, the body holds {seen[0]} in {seen[1]}"
            )
        self._trailer_head = data
        self._part = _Part.TRAILER_REST

    def _trailer_rest_length(self) -> int:
        txn_count, block_count, _ = _TRAILER_HEAD.unpack(self._trailer_head)
        entry = _TRAILER_TXN if self._major >= 2 else _TRAILER_TXN_V1
        rest: int = txn_count * entry.size + block_count * _TRAILER_BLOCK.size
        return rest + FOOTER_SIZE

    def _take_trailer(self, rest: bytes) -> EndEvent:
        assert self._records is not None
        assert self.header is not None
        index = _checked_checksums(read_index(self._trailer_head + rest), self.header)
        sequence = self._records.sequence
        body = ObjectIndex(
            transactions=sequence.transactions,
            record_offsets=sequence.record_offsets,
            blocks=self._blocks,
            raw_length=self._records.raw_length,
            object_length=self._consumed + len(rest),
        )
        differs = [f for f in _INDEX_FIELDS if getattr(index, f) != getattr(body, f)]
        if differs:
            raise FormatError(f"trailer disagrees with body: {', '.join(differs)} differ")
        self._part = _Part.DONE
        self.index = index
        return EndEvent(index.transactions, index)


def _checked_checksums(index: ObjectIndex, header: ObjectHeader) -> ObjectIndex:
    """The index with its per-transaction checksums, which must agree with the header's (and
    be absent, all zeros, where the header records none).
    """
    if index.checksums is None:
        return index
    if not header.chained:
        if any(index.checksums):
            raise FormatError("bad trailer: checksums recorded for an object without them")
        return dataclasses.replace(index, checksums=None)
    if index.checksums[-1] != header.post_checksum:
        raise FormatError("bad trailer: the last checksum is not the header's post_checksum")
    return index


#: What the body shows of the trailer (the checksums are in the trailer only).
_INDEX_FIELDS: Final = ("transactions", "record_offsets", "blocks", "raw_length", "object_length")


def _check_expected(header: ObjectHeader, name: ObjectName) -> None:
    found = (header.kind, header.first_txid, header.last_txid, header.level)
    wanted = (name.kind, name.first_txid, name.last_txid, name.level)
    if found != wanted:
        raise FormatError(
            f"object content does not match its key {name.key}: it holds a level "
            f"{header.level} {header.kind.value} of TXIDs {header.first_txid}..{header.last_txid}"
        )
    if name.chained and (header.pre_checksum, header.post_checksum) != (name.pre, name.post):
        raise FormatError(
            f"object content does not match its key {name.key}: its database checksums differ "
            "from the ones its name records"
        )


class _RecordReader:
    """Parses the raw content, block by block, into events; keeps only a partial record."""

    def __init__(self, header: ObjectHeader) -> None:
        self.sequence = _Sequence(header)
        self.raw_length = 0  # raw bytes received so far
        self._page_size = header.page_size
        self._partial = b""  # the start of a record continued in the next block
        self._info: TxnInfo | None = None  # the transaction whose pages come next

    def feed(self, raw: bytes, events: list[DecodeEvent]) -> None:
        """Parse the next verified block's raw bytes; append the events they complete."""
        base = self.raw_length - len(self._partial)  # raw offset of data[0]
        self.raw_length += len(raw)
        data = self._partial + raw if self._partial else raw
        pos, end = 0, len(data)
        record = _PGNO.size + self._page_size
        while True:
            info = self._info
            if info is None:
                if end - pos < _TXN.size:
                    break
                info = TxnInfo(*_TXN.unpack_from(data, pos))
                self._check(self.sequence.start(info, base + pos), base + pos)
                events.append(TxnStartEvent(info))
                pos += _TXN.size
                self._info = info
            else:
                count = min(self.sequence.pages_left, (end - pos) // record)
                if count == 0:
                    break
                pos = self._pages(data, pos, count, base, events)
            if not self.sequence.pages_left:
                events.append(TxnEndEvent(info))
                self._info = None
        self._partial = data[pos:]

    def _pages(
        self, data: bytes, pos: int, count: int, base: int, events: list[DecodeEvent]
    ) -> int:
        """Append `count` page events from `data[pos:]`; return the position after them."""
        assert self._info is not None
        txid, record, page = self._info.txid, _PGNO.size + self._page_size, self.sequence.page
        unpack, append = _PGNO.unpack_from, events.append
        stop = pos + count * record
        for at in range(pos, stop, record):
            (pgno,) = unpack(data, at)
            if problem := page(pgno):
                self._check(problem, base + at)
            append(PageEvent(txid, pgno, data[at + _PGNO.size : at + record]))
        return stop

    def finish(self) -> None:
        """The end-of-body marker: the raw content must end on a record boundary."""
        if self._partial:
            raise FormatError(
                f"records inconsistent with header: the body ends inside a record at raw "
                f"offset {self.raw_length - len(self._partial)}"
            )
        self._check(self.sequence.finish(), self.raw_length)

    @staticmethod
    def _check(problem: str | None, raw_offset: int) -> None:
        if problem:
            raise FormatError(
                f"records inconsistent with header at raw offset {raw_offset}: {problem}"
            )


def decode_object(
    data: bytes | memoryview, *, expected: ObjectName | None = None
) -> tuple[ObjectHeader, list[Transaction]]:
    """Decode and verify a whole object held in memory."""
    decoder = ObjectDecoder(expected=expected)
    events = decoder.feed(data)
    decoder.close()
    assert decoder.header is not None
    transactions: list[Transaction] = []
    checksums: list[int] | None = None
    for event in events:
        if isinstance(event, TxnStartEvent):
            transactions.append(Transaction(event.info, []))
        elif isinstance(event, PageEvent):
            transactions[-1].pages.append((event.pgno, event.data))
        elif isinstance(event, EndEvent):
            checksums = event.checksums
    if checksums is not None:
        transactions = [
            dataclasses.replace(t, checksum=c) for t, c in zip(transactions, checksums, strict=True)
        ]
    return decoder.header, transactions
