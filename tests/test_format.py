"""Tests for replicad.format: round trips, streaming, truncation, corruption, fuzzing, misuse."""

from __future__ import annotations

import contextlib
import random
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicad.errors import FormatError
from replicad.format import (
    FOOTER_SIZE,
    HEADER_SIZE,
    MAGIC,
    Codec,
    DecodeEvent,
    EndEvent,
    ObjectDecoder,
    ObjectHeader,
    ObjectWriter,
    PageEvent,
    Transaction,
    TxnEndEvent,
    TxnInfo,
    TxnStartEvent,
    decode_header,
    decode_object,
    encode_header,
    encode_object,
    read_index,
    read_trailer,
    trailer_span,
)
from replicad.position import ObjectKind, WalPosition, segment_name, snapshot_name

FAST = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
PAGE_SIZES = [1 << n for n in range(9, 17)]
POSITION = WalPosition(salt1=0xDEADBEEF, salt2=7, offset=32 + 24 * 4096, checksum1=1, checksum2=2)


# -------------------------------------------------------------------------------------------------
# Building objects


def make_page(seed: int, page_size: int, *, compressible: bool = True) -> bytes:
    """A page that zstd compresses well (a repeated motif) or not at all (random bytes)."""
    rnd = random.Random(seed)
    if not compressible:
        return rnd.randbytes(page_size)
    motif = rnd.randbytes(rnd.randint(1, 40))
    return (motif * (page_size // len(motif) + 1))[:page_size]


def header_for(
    kind: ObjectKind,
    page_size: int,
    txns: list[Transaction],
    *,
    codec: Codec = Codec.ZSTD,
    level: int = 0,
    position: WalPosition | None = POSITION,
) -> ObjectHeader:
    """The header that describes `txns` truthfully."""
    first, last = txns[0].info, txns[-1].info
    return ObjectHeader(
        kind=kind,
        page_size=page_size,
        level=level,
        first_txid=first.txid,
        last_txid=last.txid,
        min_time_ns=first.commit_time_ns,
        max_time_ns=last.commit_time_ns,
        db_pages=last.db_pages,
        position=position,
        codec=codec,
    )


def segment_txns(
    page_size: int, shape: list[list[int]], *, first_txid: int = 100, compressible: bool = True
) -> list[Transaction]:
    """Transactions first_txid.. with the page numbers in `shape`, one list per transaction."""
    txns = []
    for i, pgnos in enumerate(shape):
        info = TxnInfo(first_txid + i, 1_700_000_000_000_000_000 + i * 1000, 50 + i, len(pgnos))
        pages = [(p, make_page(p * 31 + i, page_size, compressible=compressible)) for p in pgnos]
        txns.append(Transaction(info, pages))
    return txns


def snapshot_txn(page_size: int, db_pages: int, *, txid: int = 42) -> list[Transaction]:
    pages = [(p, make_page(p, page_size, compressible=p % 3 != 0)) for p in range(1, db_pages + 1)]
    return [Transaction(TxnInfo(txid, 1_600_000_000_000_000_000, db_pages, db_pages), pages)]


def expected_events(txns: list[Transaction]) -> list[DecodeEvent]:
    events: list[DecodeEvent] = []
    for txn in txns:
        events.append(TxnStartEvent(txn.info))
        events += [PageEvent(txn.info.txid, pgno, data) for pgno, data in txn.pages]
        events.append(TxnEndEvent(txn.info))
    events.append(EndEvent([t.info for t in txns]))
    return events


def feed_in_chunks(data: bytes, sizes: Callable[[], int]) -> list[DecodeEvent]:
    """Decode `data` fed in chunks of `sizes()` bytes; raises what the decoder raises."""
    decoder = ObjectDecoder()
    events: list[DecodeEvent] = []
    pos = 0
    while pos < len(data):
        n = sizes()
        events += decoder.feed(data[pos : pos + n])
        pos += n
    decoder.close()
    return events


def decode_collecting(data: bytes, chunk: int) -> tuple[list[DecodeEvent], FormatError | None]:
    """Events returned before the decoder failed (if it did), and the error."""
    decoder = ObjectDecoder()
    events: list[DecodeEvent] = []
    try:
        for pos in range(0, len(data), chunk):
            events += decoder.feed(data[pos : pos + chunk])
        decoder.close()
    except FormatError as exc:
        return events, exc
    return events, None


@st.composite
def objects(draw: st.DrawFn) -> tuple[ObjectHeader, list[Transaction], int]:
    """A random valid object: (header, transactions, block size)."""
    page_size = draw(st.sampled_from(PAGE_SIZES))
    codec = draw(st.sampled_from(Codec))
    kind = draw(st.sampled_from(ObjectKind))
    compressible = draw(st.booleans())
    if kind is ObjectKind.SNAPSHOT:
        db_pages = draw(st.integers(1, 4))
        txid = draw(st.integers(1, 2**64 - 1))
        info = TxnInfo(txid, draw(st.integers(-(2**63), 2**63 - 1)), db_pages, db_pages)
        pages = [
            (p, make_page(p, page_size, compressible=compressible)) for p in range(1, 1 + db_pages)
        ]
        txns = [Transaction(info, pages)]
        level = 0
    else:
        count = draw(st.integers(1, 4))
        first = draw(st.integers(1, 2**64 - count))
        times = sorted(draw(st.lists(st.integers(0, 2**63 - 1), min_size=count, max_size=count)))
        txns = []
        for i in range(count):
            pgnos = draw(st.lists(st.integers(1, 2**32 - 1), max_size=3))
            seeds = draw(st.lists(st.integers(0, 2**32), min_size=len(pgnos), max_size=len(pgnos)))
            info = TxnInfo(first + i, times[i], draw(st.integers(1, 2**32 - 1)), len(pgnos))
            pages = [
                (p, make_page(s, page_size, compressible=compressible))
                for p, s in zip(pgnos, seeds, strict=True)
            ]
            txns.append(Transaction(info, pages))
        level = draw(st.integers(0, 99))
    position = draw(st.none() | st.just(POSITION))
    header = header_for(kind, page_size, txns, codec=codec, level=level, position=position)
    # Small blocks so records (24-byte transaction records, 4+page_size page records) span them.
    block_size = draw(st.integers(max(7, page_size // 64), 3 * page_size))
    return header, txns, block_size


def small_object(codec: Codec = Codec.ZSTD) -> tuple[bytes, list[Transaction]]:
    """A ~2 KB segment with records spanning 100-byte blocks, a page-less transaction included."""
    txns = segment_txns(512, [[3, 1], [], [7]])
    txns[2] = Transaction(txns[2].info, [(7, make_page(9, 512, compressible=False))])
    header = header_for(ObjectKind.SEGMENT, 512, txns, codec=codec)
    return encode_object(header, txns, block_size=100), txns


# -------------------------------------------------------------------------------------------------
# Round trips


@FAST
@given(objects(), st.randoms(use_true_random=False))
def test_round_trip(obj: tuple[ObjectHeader, list[Transaction], int], rnd: random.Random) -> None:
    header, txns, block_size = obj
    data = encode_object(header, txns, block_size=block_size)

    assert decode_object(data) == (header, txns)
    assert decode_header(data[:HEADER_SIZE]) == header
    assert read_trailer(data) == [t.info for t in txns]
    events = expected_events(txns)
    assert feed_in_chunks(data, lambda: rnd.randint(1, 3 * block_size)) == events


@given(st.sampled_from(Codec))
@settings(max_examples=2, deadline=None)
def test_one_byte_chunks_give_the_same_events(codec: Codec) -> None:
    data, txns = small_object(codec)
    assert feed_in_chunks(data, lambda: 1) == expected_events(txns)


def test_snapshot_round_trip_with_default_blocks() -> None:
    txns = snapshot_txn(4096, 600)  # 2.4 MB: several default-size blocks
    header = header_for(ObjectKind.SNAPSHOT, 4096, txns, position=None)
    data = encode_object(header, txns)
    assert decode_object(data, expected=snapshot_name(42, 1_600_000_000_000)) == (header, txns)
    index = read_index(data[-trailer_span(data[-FOOTER_SIZE:]) :])
    assert len(index.blocks) == 3
    assert index.record_offsets == [0]
    assert index.object_length == len(data)


def test_writer_streams_blocks_as_they_fill() -> None:
    writes: list[int] = []

    class Sink:
        def write(self, data: bytes) -> None:
            writes.append(len(data))

    txns = segment_txns(4096, [list(range(1, 11))])
    writer = ObjectWriter(Sink(), header_for(ObjectKind.SEGMENT, 4096, txns), block_size=8192)
    assert writes == [HEADER_SIZE]
    info = txns[0].info
    writer.begin_transaction(info.txid, info.commit_time_ns, info.db_pages, info.page_count)
    for pgno, page in txns[0].pages:
        writer.add_page(pgno, memoryview(page))
    assert len(writes) > 1 + 2 * 3  # four full blocks (header + data each) before finish()
    assert writer.finish() == sum(writes)


def test_incompressible_block_is_stored_raw() -> None:
    txns = segment_txns(4096, [[1]], compressible=False)
    data = encode_object(header_for(ObjectKind.SEGMENT, 4096, txns), txns)
    raw_length, stored_length, _ = struct.unpack_from("<III", data, HEADER_SIZE)
    assert raw_length == stored_length == 24 + 4 + 4096
    assert decode_object(data)[1] == txns


def test_read_trailer_needs_the_whole_trailer() -> None:
    data, txns = small_object()
    span = trailer_span(data[-FOOTER_SIZE:])
    assert read_trailer(data[-span:]) == [t.info for t in txns]
    with pytest.raises(FormatError, match="needs the last"):
        read_trailer(data[-span + 1 :])


# -------------------------------------------------------------------------------------------------
# Truncation and corruption


def verified_raw_length(data: bytes, prefix: int) -> int:
    """Raw content held by the blocks that lie entirely within data[:prefix]."""
    index = read_index(data)
    trailer_length = trailer_span(data) - FOOTER_SIZE
    ends = [b.object_offset for b in index.blocks[1:]]
    ends.append(len(data) - FOOTER_SIZE - trailer_length - 12)
    for block, end in zip(index.blocks, ends, strict=True):
        if end > prefix:
            return block.raw_offset
    return index.raw_length


@pytest.mark.parametrize("codec", list(Codec))
def test_truncation_at_every_position(codec: Codec) -> None:
    data, txns = small_object(codec)
    full = expected_events(txns)
    record = 4 + 512
    page_ends = []
    for offset, txn in zip(read_index(data).record_offsets, txns, strict=True):
        page_ends += [offset + 24 + (i + 1) * record for i in range(len(txn.pages))]

    for length in range(len(data)):
        events, error = decode_collecting(data[:length], 37)
        assert error is not None, length
        assert events == full[: len(events)]
        pages = sum(isinstance(e, PageEvent) for e in events)
        available = verified_raw_length(data, length)
        assert pages == sum(end <= available for end in page_ends), length
    assert decode_collecting(data, 37) == (full, None)


@pytest.mark.parametrize("codec", list(Codec))
def test_every_single_byte_corruption_is_caught(codec: Codec) -> None:
    data, txns = small_object(codec)
    full = expected_events(txns)
    for pos in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            corrupt = bytearray(data)
            corrupt[pos] ^= flip
            events, error = decode_collecting(bytes(corrupt), 64)
            if error is None:
                assert events == full, pos  # a bit with no meaning (e.g. zstd's unused bit)
            else:
                assert events == full[: len(events)], pos  # never a wrong page


@FAST
@given(objects(), st.data())
def test_random_corruption_never_yields_a_wrong_page(
    obj: tuple[ObjectHeader, list[Transaction], int], data: st.DataObject
) -> None:
    header, txns, block_size = obj
    encoded = bytearray(encode_object(header, txns, block_size=block_size))
    for _ in range(data.draw(st.integers(1, 3))):
        encoded[data.draw(st.integers(0, len(encoded) - 1))] ^= data.draw(st.integers(1, 255))
    full = expected_events(txns)
    events, error = decode_collecting(bytes(encoded), data.draw(st.integers(1, 5000)))
    assert events == full[: len(events)]
    if error is None:
        assert events == full


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 64))
def test_arbitrary_bytes_only_raise_format_error(blob: bytes, chunk: int) -> None:
    for candidate in (blob, MAGIC + blob, small_object()[0][:HEADER_SIZE] + blob):
        events, error = decode_collecting(candidate, chunk)
        assert error is not None
        assert not any(isinstance(e, PageEvent) for e in events)
        for read in (decode_header, read_trailer, trailer_span):
            with contextlib.suppress(FormatError):
                read(candidate)
    with pytest.raises(FormatError):
        decode_header(blob)
    with pytest.raises(FormatError):
        read_trailer(blob)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_forged_block_headers_only_raise_format_error(raw: int, stored: int, tail: bytes) -> None:
    """Block headers with a valid object header before them: any lengths, any CRC."""
    data = small_object()[0][:HEADER_SIZE] + struct.pack("<III", raw, stored, 0) + tail
    assert decode_collecting(data, 1000)[1] is not None


# -------------------------------------------------------------------------------------------------
# Foreign data, versions, names


def with_version(data: bytes, major: int) -> bytes:
    """`data` with the header's major version changed and its CRC recomputed."""
    head = bytearray(data[:HEADER_SIZE])
    struct.pack_into("<H", head, 8, major)
    struct.pack_into("<I", head, HEADER_SIZE - 4, zlib.crc32(head[: HEADER_SIZE - 4]))
    return bytes(head) + data[HEADER_SIZE:]


def test_newer_major_version_is_refused_with_upgrade_hint() -> None:
    data = with_version(small_object()[0], 3)
    for decode in (decode_object, decode_header, lambda d: ObjectDecoder().feed(d[:12])):
        with pytest.raises(FormatError, match=r"newer replicad \(format v3\); upgrade"):
            decode(data)
    footer = bytearray(data[-FOOTER_SIZE:])
    struct.pack_into("<H", footer, 16, 3)
    with pytest.raises(FormatError, match="upgrade"):
        read_trailer(data[:-FOOTER_SIZE] + footer)


@pytest.mark.parametrize(
    "foreign",
    [b"", b"\x89PNG\r\n\x1a\n" + bytes(200), b"SQLite format 3\x00" + bytes(200), b"\x89R"],
)
def test_foreign_data_is_not_a_replicad_object(foreign: bytes) -> None:
    if foreign == b"\x89R":  # a prefix of the magic: could still become an object
        with pytest.raises(FormatError, match="truncated"):
            decode_object(foreign)
        return
    with pytest.raises(FormatError, match="not a replicad object"):
        decode_object(foreign)
    with pytest.raises(FormatError, match="not a replicad object"):
        decode_header(foreign)
    if foreign:  # refused as soon as the first bytes arrive
        with pytest.raises(FormatError, match="not a replicad object"):
            ObjectDecoder().feed(foreign[:4])


def test_expected_name_must_match() -> None:
    data, txns = small_object()
    ms = txns[0].info.commit_time_ns // 1_000_000
    name = segment_name(level=0, first_txid=100, last_txid=102, min_time_ms=ms, max_time_ms=ms)
    assert decode_object(data, expected=name)[1] == txns
    wrong = [
        segment_name(level=1, first_txid=100, last_txid=102, min_time_ms=ms, max_time_ms=ms),
        segment_name(level=0, first_txid=100, last_txid=103, min_time_ms=ms, max_time_ms=ms),
        segment_name(level=0, first_txid=99, last_txid=102, min_time_ms=ms, max_time_ms=ms),
        snapshot_name(100, ms),
    ]
    for name in wrong:
        with pytest.raises(FormatError, match="does not match its key"):
            decode_object(data, expected=name)


def test_header_that_lies_about_the_records_is_refused() -> None:
    data, _ = small_object()
    header = decode_header(data)
    lies = [
        replace(header, last_txid=103),
        replace(header, first_txid=101),
        replace(header, db_pages=1),
        replace(header, max_time_ns=header.max_time_ns + 1),
    ]
    for lie in lies:
        forged = encode_header(lie) + data[HEADER_SIZE:]
        with pytest.raises(FormatError, match="records inconsistent with header"):
            decode_object(forged)


def test_trailer_that_disagrees_with_body_is_refused() -> None:
    txns = segment_txns(512, [[1], [2], [3]])
    other = list(txns)
    info = other[1].info
    other[1] = Transaction(
        TxnInfo(info.txid, info.commit_time_ns + 1, info.db_pages, 1), txns[1].pages
    )
    header = header_for(ObjectKind.SEGMENT, 512, txns, codec=Codec.NONE)
    data = encode_object(header, txns)
    forged = encode_object(header, other)
    assert len(forged) == len(data)
    body_end = len(data) - trailer_span(data)
    with pytest.raises(FormatError, match="trailer disagrees with body: transactions"):
        decode_object(data[:body_end] + forged[body_end:])


def test_body_ending_inside_a_record_is_refused() -> None:
    txns = segment_txns(512, [[1]])
    chunks: list[bytes] = []
    writer = ObjectWriter(_Collect(chunks), header_for(ObjectKind.SEGMENT, 512, txns))
    info = txns[0].info
    writer.begin_transaction(info.txid, info.commit_time_ns, info.db_pages, 1)
    writer.add_page(1, txns[0].pages[0][1])
    writer._pending += bytes(10)  # a torn record after the last transaction
    writer.finish()
    with pytest.raises(FormatError, match="ends inside a record"):
        decode_object(b"".join(chunks))


def test_trailing_bytes_and_reuse_after_error() -> None:
    data, _ = small_object()
    with pytest.raises(FormatError, match="trailing bytes"):
        decode_object(data + b"\0")
    decoder = ObjectDecoder()
    with pytest.raises(FormatError, match="not a replicad object"):
        decoder.feed(b"GIF89a")
    with pytest.raises(FormatError, match="not a replicad object"):
        decoder.feed(data)  # a failed decoder stays failed
    with pytest.raises(FormatError, match="not a replicad object"):
        decoder.close()


# -------------------------------------------------------------------------------------------------
# Writer misuse


def _segment_writer() -> ObjectWriter:
    txns = segment_txns(512, [[1, 2], [3]])
    return ObjectWriter(_Discard(), header_for(ObjectKind.SEGMENT, 512, txns))


class _Collect:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def write(self, data: bytes) -> None:
        self.chunks.append(data)


class _Discard:
    def write(self, data: bytes) -> None:
        pass


T0 = 1_700_000_000_000_000_000
PAGE = bytes(512)


def _wrong_page_size(w: ObjectWriter) -> None:
    w.begin_transaction(100, T0, 50, 2)
    w.add_page(1, bytes(511))


def _pgno_zero(w: ObjectWriter) -> None:
    w.begin_transaction(100, T0, 50, 2)
    w.add_page(0, PAGE)


def _txid_not_first(w: ObjectWriter) -> None:
    w.begin_transaction(99, T0, 50, 2)


def _txid_gap(w: ObjectWriter) -> None:
    w.begin_transaction(100, T0, 50, 0)
    w.begin_transaction(102, T0, 50, 0)


def _past_last_txid(w: ObjectWriter) -> None:
    w.begin_transaction(100, T0, 50, 0)
    w.begin_transaction(101, T0 + 1000, 51, 0)
    w.begin_transaction(102, T0 + 1000, 51, 0)


def _too_many_pages(w: ObjectWriter) -> None:
    w.begin_transaction(100, T0, 50, 1)
    w.add_page(1, PAGE)
    w.add_page(2, PAGE)


def _too_few_pages(w: ObjectWriter) -> None:
    w.begin_transaction(100, T0, 50, 2)
    w.add_page(1, PAGE)
    w.begin_transaction(101, T0 + 1000, 51, 1)


def _finish_open_transaction(w: ObjectWriter) -> None:
    w.begin_transaction(100, T0, 50, 2)
    w.finish()


def _finish_before_last_txid(w: ObjectWriter) -> None:
    w.begin_transaction(100, T0, 50, 0)
    w.finish()


def _time_goes_back(w: ObjectWriter) -> None:
    w.begin_transaction(100, T0, 50, 0)
    w.begin_transaction(101, T0 - 1, 51, 0)


def _wrong_final_db_pages(w: ObjectWriter) -> None:
    w.begin_transaction(100, T0, 50, 0)
    w.begin_transaction(101, T0 + 1000, 7, 0)
    w.finish()


def _use_after_finish(w: ObjectWriter) -> None:
    w.begin_transaction(100, T0, 50, 0)
    w.begin_transaction(101, T0 + 1000, 51, 0)
    w.finish()
    w.finish()


@pytest.mark.parametrize(
    ("misuse", "message"),
    [
        (_wrong_page_size, "is 511 bytes, not 512"),
        (_pgno_zero, "page number 0 out of range"),
        (_txid_not_first, "transaction 99 where 100 should come next"),
        (_txid_gap, "transaction 102 where 101 should come next"),
        (_past_last_txid, "past the object's last TXID 101"),
        (_too_many_pages, "page 2 outside a transaction"),
        (_too_few_pages, "transaction 100 still expects 1 pages"),
        (_finish_open_transaction, "transaction 100 is missing 2 pages"),
        (_finish_before_last_txid, "transactions end at 100, but the header says 101"),
        (_time_goes_back, "commit times never decrease"),
        (_wrong_final_db_pages, "last database size 7"),
        (_use_after_finish, "already finished"),
    ],
)
def test_writer_misuse_raises_value_error(
    misuse: Callable[[ObjectWriter], None], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        misuse(_segment_writer())


def test_snapshot_writer_rules() -> None:
    txns = snapshot_txn(512, 3)
    header = header_for(ObjectKind.SNAPSHOT, 512, txns)
    writer = ObjectWriter(_Discard(), header)
    with pytest.raises(ValueError, match="holds all 3 pages"):
        writer.begin_transaction(42, txns[0].info.commit_time_ns, 3, 2)
    writer.begin_transaction(42, txns[0].info.commit_time_ns, 3, 3)
    with pytest.raises(ValueError, match="page 2 where 1 should come next"):
        writer.add_page(2, PAGE)
    writer.add_page(1, PAGE)  # the failed call changed nothing


@pytest.mark.parametrize(
    "changes",
    [
        {"page_size": 1000},
        {"page_size": 256},
        {"level": 100},
        {"first_txid": 0},
        {"first_txid": 5, "last_txid": 4},
        {"min_time_ns": 2, "max_time_ns": 1},
        {"db_pages": 0},
        {"kind": ObjectKind.SNAPSHOT},  # a snapshot of TXIDs 100..101
        {"position": WalPosition(2**32, 0, 0, 0, 0)},
    ],
)
def test_invalid_header_raises_value_error(changes: dict[str, Any]) -> None:
    txns = segment_txns(512, [[1], [2]])
    header = replace(header_for(ObjectKind.SEGMENT, 512, txns), **changes)
    with pytest.raises(ValueError, match="invalid object header"):
        ObjectWriter(_Discard(), header)


def test_invalid_block_size_raises_value_error() -> None:
    txns = segment_txns(512, [[1]])
    with pytest.raises(ValueError, match="block_size"):
        encode_object(header_for(ObjectKind.SEGMENT, 512, txns), txns, block_size=0)
