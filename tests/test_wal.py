"""Tests for replicad.wal: real SQLite WALs, crafted WALs, fuzzing, and the fast checksum.

Crafted WALs are built here with a word-by-word reference checksum written from SQLite's
``walChecksumBytes``, independent of the module's matrix formulation.
"""

from __future__ import annotations

import random
import sqlite3
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicad.errors import WalError
from replicad.position import WalPosition
from replicad.wal import (
    FRAME_HEADER_SIZE,
    WAL_FORMAT_VERSION,
    WAL_HEADER_SIZE,
    WAL_MAGIC_BE,
    WAL_MAGIC_LE,
    StopReason,
    WalFrame,
    WalHeader,
    WalScan,
    WalTransaction,
    frame_checksums,
    parse_wal_header,
    scan_frames,
)

MASK = 0xFFFFFFFF
PAGE_SIZES = [512 << k for k in range(8)]  # 512 .. 65536
SALTS = (0x0102_0304, 0xA0B0_C0D0)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- reference implementation and WAL builder ---------------------------------------------


def ref_checksum(data: bytes, *, big_endian: bool, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    """SQLite's walChecksumBytes, one word pair at a time."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & MASK
        s1 = (s1 + words[i + 1] + s0) & MASK
    return s0, s1


def ref_frame_checksums(
    buf: bytes, *, page_size: int, big_endian: bool, initial: tuple[int, int], count: int
) -> list[tuple[int, int]]:
    """Running checksum after each frame, the slow obvious way."""
    frame_size = FRAME_HEADER_SIZE + page_size
    state, out = initial, []
    for i in range(count):
        frame = buf[i * frame_size : (i + 1) * frame_size]
        state = ref_checksum(
            frame[:8] + frame[FRAME_HEADER_SIZE:], big_endian=big_endian, s0=state[0], s1=state[1]
        )
        out.append(state)
    return out


def make_header(
    page_size: int = 512,
    *,
    big_endian: bool = False,
    salts: tuple[int, int] = SALTS,
    magic: int | None = None,
    version: int = WAL_FORMAT_VERSION,
) -> bytes:
    """A WAL header with a correct checksum (unless the caller corrupts it afterwards)."""
    if magic is None:
        magic = WAL_MAGIC_BE if big_endian else WAL_MAGIC_LE
    first = struct.pack(">6I", magic, version, page_size, 7, *salts)
    return first + struct.pack(">2I", *ref_checksum(first, big_endian=bool(magic & 1)))


@dataclass
class WalBuilder:
    """Builds a -wal file frame by frame, chaining checksums like SQLite."""

    page_size: int = 512
    big_endian: bool = False
    salts: tuple[int, int] = SALTS
    seed: int = 0
    header: bytes = b""
    body: bytearray = field(default_factory=bytearray)
    state: tuple[int, int] = (0, 0)
    commits: int = 0

    def __post_init__(self) -> None:
        self.header = make_header(self.page_size, big_endian=self.big_endian, salts=self.salts)
        self.state = struct.unpack(">2I", self.header[24:])
        self.rng = random.Random(self.seed)

    @property
    def frame_size(self) -> int:
        return FRAME_HEADER_SIZE + self.page_size

    def frame(self, pgno: int, db_size: int = 0, *, salts: tuple[int, int] | None = None) -> None:
        """Append one frame with a correct checksum (and, unless given, the header's salts)."""
        page = self.rng.randbytes(self.page_size)
        first = struct.pack(">2I", pgno, db_size)
        self.state = ref_checksum(
            first + page, big_endian=self.big_endian, s0=self.state[0], s1=self.state[1]
        )
        self.body += first + struct.pack(">4I", *(salts or self.salts), *self.state) + page

    def transaction(self, pages: int, *, commit: bool = True) -> None:
        """Append `pages` frames, the last a commit frame unless `commit` is False."""
        for i in range(pages):
            last = commit and i == pages - 1
            self.frame(pgno=i + 1, db_size=pages + 10 if last else 0)
        self.commits += commit

    def wal(self) -> bytes:
        return self.header + bytes(self.body)


def ref_scan(header: WalHeader, buf: bytes, start: WalPosition) -> WalScan:
    """scan_frames written the obvious way, one frame at a time."""
    frame_size, salts = header.frame_size, (header.salt1, header.salt2)
    state, pending = (start.checksum1, start.checksum2), []
    scan = WalScan([], start, 0, StopReason.END_OF_DATA)
    for rel in range(0, len(buf), frame_size):
        frame = buf[rel : rel + frame_size]
        if len(frame) < frame_size:
            return replace(scan, stop_reason=StopReason.PARTIAL_FRAME)
        pgno, db_size, salt1, salt2, sum1, sum2 = struct.unpack(">6I", frame[:24])
        state = ref_checksum(
            frame[:8] + frame[24:], big_endian=header.big_endian_checksum, s0=state[0], s1=state[1]
        )
        if (salt1, salt2) != salts:
            return replace(scan, stop_reason=StopReason.SALT_MISMATCH)
        if pgno == 0 or (sum1, sum2) != state:
            return replace(scan, stop_reason=StopReason.CHECKSUM_MISMATCH)
        pending.append(WalFrame(pgno, start.offset + rel, memoryview(frame)[24:]))
        if db_size:
            end = WalPosition(salts[0], salts[1], start.offset + rel + frame_size, *state)
            transactions = [*scan.transactions, WalTransaction(pending, db_size, end)]
            scan, pending = WalScan(transactions, end, 0, scan.stop_reason), []
        else:
            scan = replace(scan, uncommitted_frames=len(pending))
    return scan


def scan_all(wal: bytes) -> WalScan:
    """Parse the header and scan everything after it."""
    header = parse_wal_header(wal)
    start = header.initial_position()
    return scan_frames(header, wal[start.offset :], start)


def scan_in_chunks(wal: bytes, chunk: int) -> list[WalTransaction]:
    """Scan like the daemon: bounded reads resumed from scan.end, growing a read that finds
    no whole transaction (one larger than the chunk).
    """
    header = parse_wal_header(wal)
    position, found, size = header.initial_position(), [], chunk
    while True:
        scan = scan_frames(header, wal[position.offset : position.offset + size], position)
        found += scan.transactions
        if scan.end != position:
            position, size = scan.end, chunk
        elif position.offset + size < len(wal):
            size *= 2
        else:
            return found


def last_frame_checksum(wal: bytes, offset: int, frame_size: int) -> tuple[int, int]:
    """The checksum stored in the header of the frame just before `offset`."""
    frame = offset - frame_size
    return struct.unpack(">2I", wal[frame + 16 : frame + 24])


def transaction_pages(scan: WalScan) -> list[list[int]]:
    return [[f.pgno for f in t.frames] for t in scan.transactions]


# --- the header ----------------------------------------------------------------------------


@pytest.mark.parametrize("big_endian", [False, True])
def test_parse_header_reads_every_field(big_endian: bool) -> None:
    header = parse_wal_header(make_header(4096, big_endian=big_endian))
    assert header.big_endian_checksum is big_endian
    assert (header.page_size, header.checkpoint_seq) == (4096, 7)
    assert (header.salt1, header.salt2) == SALTS
    assert header.frame_size == 4096 + 24
    assert header.initial_position() == WalPosition(
        salt1=SALTS[0],
        salt2=SALTS[1],
        offset=32,
        checksum1=header.checksum1,
        checksum2=header.checksum2,
    )


def test_parse_header_accepts_memoryview_and_longer_data() -> None:
    data = make_header() + b"\xff" * 100
    assert parse_wal_header(memoryview(data)) == parse_wal_header(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", "0 bytes", id="empty"),
        pytest.param(make_header()[:31], "31 bytes", id="short"),
        pytest.param(make_header(magic=0x377F0684), "magic", id="magic"),
        pytest.param(make_header(version=3007001), "version", id="version"),
        pytest.param(make_header(page_size=1000), "page size", id="page-size-not-power-of-2"),
        pytest.param(make_header(page_size=256), "page size", id="page-size-small"),
        pytest.param(make_header(page_size=131072), "page size", id="page-size-large"),
        pytest.param(make_header(page_size=1), "page size", id="page-size-1"),
        pytest.param(make_header()[:24] + bytes(8), "checksum", id="checksum"),
        # A big-endian header relabelled little-endian: the checksum no longer verifies.
        pytest.param(
            make_header(big_endian=True)[:3] + b"\x82" + make_header(big_endian=True)[4:],
            "checksum",
            id="checksum-byte-order",
        ),
    ],
)
def test_bad_header_raises_wal_error_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(WalError, match=message) as info:
        parse_wal_header(data)
    assert info.value.hint


@FAST
@given(st.binary(max_size=64))
def test_parse_header_raises_only_wal_error(data: bytes) -> None:
    with suppress(WalError):
        parse_wal_header(data)


# --- crafted WALs ----------------------------------------------------------------------------


@pytest.mark.parametrize("big_endian", [False, True])
def test_scan_returns_every_committed_transaction(big_endian: bool) -> None:
    builder = WalBuilder(big_endian=big_endian)
    for pages in (1, 3, 2, 5):
        builder.transaction(pages)
    wal = builder.wal()
    scan = scan_all(wal)
    assert transaction_pages(scan) == [[1], [1, 2, 3], [1, 2], [1, 2, 3, 4, 5]]
    assert [t.db_pages for t in scan.transactions] == [11, 13, 12, 15]
    assert scan.stop_reason is StopReason.END_OF_DATA
    assert scan.uncommitted_frames == 0
    assert scan.end.offset == len(wal)
    assert (scan.end.checksum1, scan.end.checksum2) == last_frame_checksum(
        wal, len(wal), builder.frame_size
    )
    first = scan.transactions[0].frames[0]
    assert first.offset == 32
    assert bytes(first.data) == wal[32 + 24 : 32 + builder.frame_size]


@pytest.mark.parametrize("big_endian", [False, True])
def test_uncommitted_tail_is_counted_not_returned(big_endian: bool) -> None:
    builder = WalBuilder(big_endian=big_endian)
    builder.transaction(2)
    committed_end = WAL_HEADER_SIZE + len(builder.body)
    builder.transaction(3, commit=False)
    scan = scan_all(builder.wal())
    assert len(scan.transactions) == 1
    assert scan.uncommitted_frames == 3
    assert scan.end.offset == committed_end
    assert scan.stop_reason is StopReason.END_OF_DATA


@pytest.mark.parametrize("big_endian", [False, True])
def test_torn_last_frame_ends_the_log(big_endian: bool) -> None:
    builder = WalBuilder(big_endian=big_endian)
    builder.transaction(2)
    builder.transaction(2)
    for cut in (1, 24, builder.frame_size - 1):
        scan = scan_all(builder.wal()[:-cut])
        assert len(scan.transactions) == 1
        assert scan.uncommitted_frames == 1
        assert scan.stop_reason is StopReason.PARTIAL_FRAME


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("salts", [(SALTS[0] + 1, SALTS[1]), (SALTS[0], SALTS[1] ^ 1)])
def test_salt_mismatch_ends_the_log(big_endian: bool, salts: tuple[int, int]) -> None:
    builder = WalBuilder(big_endian=big_endian)
    builder.transaction(2)
    builder.frame(1, db_size=5, salts=salts)  # the chain is right, the salts are not
    builder.transaction(1)
    scan = scan_all(builder.wal())
    assert len(scan.transactions) == 1
    assert scan.stop_reason is StopReason.SALT_MISMATCH


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("where", ["page", "page number", "db size", "stored checksum"])
def test_bad_checksum_in_the_middle_ends_the_log(big_endian: bool, where: str) -> None:
    builder = WalBuilder(big_endian=big_endian)
    builder.transaction(3)
    builder.transaction(4)
    builder.transaction(2)
    wal = bytearray(builder.wal())
    frame = WAL_HEADER_SIZE + 4 * builder.frame_size  # the second frame of the 2nd transaction
    byte = {"page": 300, "page number": 2, "db size": 7, "stored checksum": 21}[where]
    wal[frame + byte] ^= 0x40
    scan = scan_all(bytes(wal))
    assert transaction_pages(scan) == [[1, 2, 3]]
    assert scan.uncommitted_frames == 1
    assert scan.stop_reason is StopReason.CHECKSUM_MISMATCH


def test_page_number_zero_ends_the_log() -> None:
    builder = WalBuilder()
    builder.transaction(1)
    builder.frame(0, db_size=3)
    scan = scan_all(builder.wal())
    assert len(scan.transactions) == 1
    assert scan.stop_reason is StopReason.CHECKSUM_MISMATCH


@pytest.mark.parametrize("big_endian", [False, True])
def test_frames_left_from_before_a_restart_are_ignored(big_endian: bool) -> None:
    old = WalBuilder(big_endian=big_endian, salts=SALTS)
    for pages in (2, 2, 3):
        old.transaction(pages)
    new = WalBuilder(big_endian=big_endian, salts=(SALTS[0] + 1, 0x5555_AAAA), seed=1)
    new.transaction(2)
    # A restart rewrites the header and overwrites frames from the start; the old tail remains.
    wal = new.wal() + bytes(old.body[len(new.body) :])
    scan = scan_all(wal)
    assert transaction_pages(scan) == [[1, 2]]
    assert scan.stop_reason is StopReason.SALT_MISMATCH
    assert scan.end.salt1 == SALTS[0] + 1


def test_the_other_byte_order_does_not_verify() -> None:
    builder = WalBuilder(big_endian=False)
    builder.transaction(2)
    wal = bytearray(builder.wal())
    wal[:32] = make_header(big_endian=True)
    scan = scan_all(bytes(wal))
    assert scan.transactions == []
    assert scan.stop_reason is StopReason.CHECKSUM_MISMATCH


def test_empty_buffer_returns_the_start() -> None:
    builder = WalBuilder()
    header = parse_wal_header(builder.wal())
    scan = scan_frames(header, b"", header.initial_position())
    assert scan == WalScan([], header.initial_position(), 0, StopReason.END_OF_DATA)


def test_frame_data_is_a_view_of_the_callers_buffer() -> None:
    builder = WalBuilder()
    builder.transaction(2)
    wal = builder.wal()
    header = parse_wal_header(wal)
    body = wal[WAL_HEADER_SIZE:]
    frame = scan_frames(header, body, header.initial_position()).transactions[0].frames[1]
    assert frame.data.obj is body
    assert len(frame.data) == builder.page_size


def test_scan_accepts_a_memoryview_of_another_format() -> None:
    builder = WalBuilder()
    builder.transaction(3)
    wal = builder.wal()
    header = parse_wal_header(wal)
    body = memoryview(wal[WAL_HEADER_SIZE:]).cast("I")
    assert scan_frames(header, body, header.initial_position()) == scan_all(wal)


def test_bad_start_position_raises_value_error() -> None:
    builder = WalBuilder()
    builder.transaction(1)
    header = parse_wal_header(builder.wal())
    start = header.initial_position()
    for bad in (
        replace(start, offset=33),
        replace(start, offset=0),
        replace(start, offset=32 + builder.frame_size + 8),
        replace(start, salt2=start.salt2 + 1),
        replace(start, checksum1=-1),
        replace(start, checksum2=1 << 32),
    ):
        with pytest.raises(ValueError):  # noqa: PT011 -- every message is a different caller bug
            scan_frames(header, b"", bad)


@st.composite
def crafted_wals(draw: st.DrawFn) -> WalBuilder:
    """Small WALs: a few transactions, maybe an uncommitted tail, either byte order."""
    builder = WalBuilder(big_endian=draw(st.booleans()), seed=draw(st.integers(0, 1000)))
    for pages in draw(st.lists(st.integers(1, 4), max_size=6)):
        builder.transaction(pages)
    builder.transaction(draw(st.integers(0, 3)), commit=False)
    return builder


@FAST
@given(crafted_wals(), st.data())
def test_resuming_at_any_frame_boundary_matches_a_full_scan(
    builder: WalBuilder, data: st.DataObject
) -> None:
    wal = builder.wal()
    full = scan_all(wal)
    header = parse_wal_header(wal)
    frames = len(builder.body) // builder.frame_size
    split = WAL_HEADER_SIZE + data.draw(st.integers(0, frames)) * builder.frame_size
    first = scan_frames(header, wal[WAL_HEADER_SIZE:split], header.initial_position())
    rest = scan_frames(header, wal[first.end.offset :], first.end)
    assert first.transactions + rest.transactions == full.transactions
    assert (rest.end, rest.uncommitted_frames, rest.stop_reason) == (
        full.end,
        full.uncommitted_frames,
        full.stop_reason,
    )
    assert len(full.transactions) == builder.commits


@FAST
@given(crafted_wals(), st.integers(1, 3000))
def test_chunked_reads_of_any_size_find_every_transaction(builder: WalBuilder, chunk: int) -> None:
    wal = builder.wal()
    assert scan_in_chunks(wal, chunk) == scan_all(wal).transactions


# --- fuzzing: garbage ends the log, it never raises -----------------------------------------


@FAST
@given(
    st.sampled_from([512, 1024]),
    st.booleans(),
    st.binary(max_size=5000),
    st.tuples(st.integers(0, MASK), st.integers(0, MASK)),
)
def test_scan_of_random_bytes_never_raises(
    page_size: int, big_endian: bool, junk: bytes, checksum: tuple[int, int]
) -> None:
    header = parse_wal_header(make_header(page_size, big_endian=big_endian))
    start = replace(header.initial_position(), checksum1=checksum[0], checksum2=checksum[1])
    assert scan_frames(header, junk, start) == ref_scan(header, junk, start)


@FAST
@given(
    crafted_wals(),
    st.lists(st.tuples(st.integers(WAL_HEADER_SIZE, 5000), st.integers(1, 255)), max_size=4),
    st.integers(0, 5000),
)
def test_mutated_wal_scans_like_the_reference(
    builder: WalBuilder, flips: list[tuple[int, int]], cut: int
) -> None:
    # Compared with the reference rather than with the unmutated scan: SQLite's checksum is
    # weak (flipping the top bits of a few well-chosen words keeps it), so a mutated frame
    # can legitimately still verify.
    mutated = bytearray(builder.wal())
    for position, mask in flips:
        if position < len(mutated):
            mutated[position] ^= mask
    del mutated[max(WAL_HEADER_SIZE, len(mutated) - cut) :]
    header = parse_wal_header(bytes(mutated))
    body = bytes(mutated[WAL_HEADER_SIZE:])
    assert scan_frames(header, body, header.initial_position()) == ref_scan(
        header, body, header.initial_position()
    )


# --- the fast checksum equals the reference --------------------------------------------------


@FAST
@given(
    st.sampled_from(PAGE_SIZES),
    st.booleans(),
    st.tuples(st.integers(0, MASK), st.integers(0, MASK)),
    st.integers(0, 3),
    st.randoms(use_true_random=False),
)
def test_fast_checksum_equals_reference(
    page_size: int, big_endian: bool, initial: tuple[int, int], count: int, rnd: random.Random
) -> None:
    buf = rnd.randbytes((page_size + FRAME_HEADER_SIZE) * count + rnd.randrange(8))
    fast = frame_checksums(
        buf, page_size=page_size, big_endian=big_endian, initial=initial, count=count
    )
    assert fast.shape == (count, 2)
    assert [tuple(row) for row in fast.tolist()] == ref_frame_checksums(
        buf, page_size=page_size, big_endian=big_endian, initial=initial, count=count
    )


@pytest.mark.parametrize("page_size", [512, 4096])
@pytest.mark.parametrize("big_endian", [False, True])
def test_fast_checksum_across_many_blocks(page_size: int, big_endian: bool) -> None:
    # Enough frames to cross several blocks and every span of the prefix scan.
    count = 2600 if page_size == 512 else 600
    buf = random.Random(page_size).randbytes((page_size + FRAME_HEADER_SIZE) * count)
    fast = frame_checksums(
        buf, page_size=page_size, big_endian=big_endian, initial=(1, 2), count=count
    )
    reference = ref_frame_checksums(
        buf, page_size=page_size, big_endian=big_endian, initial=(1, 2), count=count
    )
    assert [tuple(row) for row in fast.tolist()] == reference


def test_frame_checksums_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="page size"):
        frame_checksums(b"", page_size=1000, big_endian=False, initial=(0, 0), count=0)
    with pytest.raises(ValueError, match="does not hold"):
        frame_checksums(b"\0" * 600, page_size=512, big_endian=False, initial=(0, 0), count=2)
    assert frame_checksums(b"", page_size=512, big_endian=False, initial=(0, 0), count=0).shape == (
        0,
        2,
    )


# --- real WALs written by SQLite -------------------------------------------------------------


@contextmanager
def wal_database(path: Path, page_size: int) -> Iterator[sqlite3.Connection]:
    """A WAL-mode database that never checkpoints on its own; open while the test reads."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA page_size={page_size}")
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
        conn.execute("PRAGMA wal_autocheckpoint=0")
        yield conn
    finally:
        conn.close()


def write_transactions(conn: sqlite3.Connection, rng: random.Random) -> int:
    """Small and large (many-page) transactions; returns how many commits were made."""
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, body BLOB)")
    commits = 1
    for size in (10, 300_000, 50, 1_500_000, 5, 40_000):
        conn.execute("BEGIN")
        for _ in range(3):
            conn.execute("INSERT INTO t(body) VALUES (?)", (rng.randbytes(size),))
        conn.execute("COMMIT")
        commits += 1
    conn.execute("UPDATE t SET body = zeroblob(100) WHERE id % 2 = 0")  # autocommit
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t(body) VALUES (x'00')")
    conn.execute("ROLLBACK")
    return commits + 1


def apply(base: bytes, transactions: list[WalTransaction], page_size: int) -> bytes:
    """The database file a full checkpoint of `transactions` would produce."""
    db = bytearray(base)
    for transaction in transactions:
        for frame in transaction.frames:
            start = (frame.pgno - 1) * page_size
            db.extend(bytes(max(0, start + page_size - len(db))))
            db[start : start + page_size] = frame.data
        del db[transaction.db_pages * page_size :]
    return bytes(db)


@pytest.mark.parametrize("page_size", [1024, 4096, 65536])
def test_real_wal_scans_every_commit(tmp_path: Path, page_size: int) -> None:
    path = tmp_path / "real.db"
    with wal_database(path, page_size) as conn:
        base = path.read_bytes()
        commits = write_transactions(conn, random.Random(page_size))
        wal = (tmp_path / "real.db-wal").read_bytes()
        header = parse_wal_header(wal)
        scan = scan_all(wal)
        assert header.page_size == page_size
        assert len(scan.transactions) == commits
        assert max(len(t.frames) for t in scan.transactions) > 1_000_000 // page_size
        assert scan.end.offset == len(wal)
        assert (scan.end.checksum1, scan.end.checksum2) == last_frame_checksum(
            wal, len(wal), header.frame_size
        )
        assert scan.stop_reason is StopReason.END_OF_DATA
        assert apply(base, scan.transactions, page_size) == conn.serialize()
        assert scan_in_chunks(wal, 64 * 1024) == scan.transactions


def test_real_wal_after_restart_ignores_the_old_generation(tmp_path: Path) -> None:
    path = tmp_path / "restart.db"
    with wal_database(path, 4096) as conn:
        write_transactions(conn, random.Random(1))
        old = parse_wal_header((tmp_path / "restart.db-wal").read_bytes())
        assert conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 0
        conn.execute("INSERT INTO t(body) VALUES (x'01')")
        wal = (tmp_path / "restart.db-wal").read_bytes()
        header = parse_wal_header(wal)
        assert (header.salt1, header.salt2) != (old.salt1, old.salt2)
        scan = scan_all(wal)
        assert len(scan.transactions) == 1
        assert scan.stop_reason is StopReason.SALT_MISMATCH
        assert scan.end.offset < len(wal)


def test_walframe_equality_compares_page_contents() -> None:
    # Tests above compare transactions from different buffers; that relies on this.
    assert WalFrame(1, 32, memoryview(b"ab")) == WalFrame(1, 32, memoryview(bytearray(b"ab")))
    assert WalFrame(1, 32, memoryview(b"ab")) != WalFrame(1, 32, memoryview(b"ac"))
