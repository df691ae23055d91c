"""Positions in the WAL, transaction IDs, and the names of objects in a replica.

Pure: no I/O.  A *TXID* counts SQLite commits in one database's replicated history; it only
ever grows, across daemon restarts and continuity losses.  Every object key encodes its TXID
range and commit-time range with fixed-width fields, so a lexical listing is TXID order and a
restore can be planned from one listing without reading any object.

Key layout (relative to the replica's root), format v2::

    snapshots/<txid:016x>-<time_ms:013d>-<post:016x>.snap
    segments/<level:02d>/<first:016x>-<last:016x>-<min_ms:013d>-<max_ms:013d>-<pre:016x>-<post:016x>.seg

`pre` and `post` are the database's checksum before and after the object (`replicad.checksum`),
so a listing alone shows which objects chain into one history: a planner can refuse a splice
without downloading anything.  Format v1 keys (without them) are still read; their objects
prove nothing about their neighbours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

SNAPSHOT_PREFIX = "snapshots/"
SEGMENT_PREFIX = "segments/"

_SNAPSHOT_RE = re.compile(
    r"^snapshots/(?P<txid>[0-9a-f]{16})-(?P<ms>\d{13})(?:-(?P<post>[0-9a-f]{16}))?\.snap$"
)
_SEGMENT_RE = re.compile(
    r"^segments/(?P<level>\d{2})/(?P<first>[0-9a-f]{16})-(?P<last>[0-9a-f]{16})"
    r"-(?P<min>\d{13})-(?P<max>\d{13})(?:-(?P<pre>[0-9a-f]{16})-(?P<post>[0-9a-f]{16}))?\.seg$"
)
#: The checksum fields of a v1 name, which records none.
NO_CHECKSUM = -1
_MAX_TXID = 2**64 - 1
_MAX_MS = 10**13 - 1


@dataclass(frozen=True, slots=True)
class WalPosition:
    """Where the next unread frame of a WAL generation starts, and the checksum chain there.

    A *generation* is one life of the -wal file between restarts; its salts identify it.
    `checksum1`/`checksum2` are the cumulative checksum after the frame just before `offset`
    (the header's checksum when `offset` is the first frame), so reading can resume and verify
    the chain without re-reading the generation from the start.
    """

    salt1: int
    salt2: int
    offset: int
    checksum1: int
    checksum2: int

    def same_generation(self, salt1: int, salt2: int) -> bool:
        """True when a WAL header with these salts belongs to this position's generation."""
        return self.salt1 == salt1 and self.salt2 == salt2


class ObjectKind(StrEnum):
    """What an object in a replica holds (ordered by name, so `ObjectName`s always sort)."""

    SNAPSHOT = "snapshot"
    SEGMENT = "segment"


@dataclass(frozen=True, slots=True, order=True)
class ObjectName:
    """The parsed name of a snapshot or segment: everything a planner needs, no download.

    Ordering is (first_txid, level, kind, ...) so sorted names are in history order.
    Snapshots have `first_txid == last_txid`, `level == 0` and `pre == 0`.  `pre`/`post` are
    the database checksums before and after the object, `NO_CHECKSUM` in a v1 name.
    """

    first_txid: int
    last_txid: int
    level: int
    kind: ObjectKind
    min_time_ms: int
    max_time_ms: int
    pre: int = NO_CHECKSUM
    post: int = NO_CHECKSUM

    @property
    def chained(self) -> bool:
        """True for a v2 name: it records the checksums that chain it to its neighbours."""
        return self.post != NO_CHECKSUM

    def follows(self, checksum: int) -> bool:
        """Whether this object applies to a state with database checksum `checksum`
        (`NO_CHECKSUM`: a state of unknown checksum, which anything may follow, unproven).
        """
        if self.kind is ObjectKind.SNAPSHOT:
            return True
        return not self.chained or checksum in (NO_CHECKSUM, self.pre)

    @property
    def key(self) -> str:
        """The object's key relative to the replica root."""
        if self.kind is ObjectKind.SNAPSHOT:
            tail = f"-{self.post:016x}" if self.chained else ""
            return f"{SNAPSHOT_PREFIX}{self.first_txid:016x}-{self.max_time_ms:013d}{tail}.snap"
        tail = f"-{self.pre:016x}-{self.post:016x}" if self.chained else ""
        return (
            f"{SEGMENT_PREFIX}{self.level:02d}/{self.first_txid:016x}-{self.last_txid:016x}"
            f"-{self.min_time_ms:013d}-{self.max_time_ms:013d}{tail}.seg"
        )


def snapshot_name(txid: int, time_ms: int, *, post: int = NO_CHECKSUM) -> ObjectName:
    """Name of a snapshot of the database as of `txid`, taken at `time_ms` (Unix ms), whose
    database checksum is `post`.
    """
    _check_txid(txid)
    _check_ms(time_ms)
    _check_checksum(post)
    pre = 0 if post != NO_CHECKSUM else NO_CHECKSUM
    return ObjectName(txid, txid, 0, ObjectKind.SNAPSHOT, time_ms, time_ms, pre, post)


def segment_name(
    *,
    level: int,
    first_txid: int,
    last_txid: int,
    min_time_ms: int,
    max_time_ms: int,
    pre: int = NO_CHECKSUM,
    post: int = NO_CHECKSUM,
) -> ObjectName:
    """Name of a segment holding transactions `first_txid..last_txid` (inclusive), taking the
    database from checksum `pre` to `post`.
    """
    _check_txid(first_txid)
    _check_txid(last_txid)
    _check_ms(min_time_ms)
    _check_ms(max_time_ms)
    _check_checksum(pre)
    _check_checksum(post)
    if (pre == NO_CHECKSUM) != (post == NO_CHECKSUM):
        raise ValueError("a segment records both checksums or neither")
    if not 0 <= level <= 99:
        raise ValueError(f"segment level {level} out of range 0..99")
    if last_txid < first_txid:
        raise ValueError(f"segment TXID range {first_txid}..{last_txid} is reversed")
    return ObjectName(
        first_txid, last_txid, level, ObjectKind.SEGMENT, min_time_ms, max_time_ms, pre, post
    )


def parse_key(key: str) -> ObjectName | None:
    """Parse a key relative to the replica root; None for anything that is not ours."""
    if m := _SNAPSHOT_RE.match(key):
        txid = int(m["txid"], 16)
        ms = int(m["ms"])
        post = _checksum_field(m["post"])
        pre = NO_CHECKSUM if post == NO_CHECKSUM else 0
        return ObjectName(txid, txid, 0, ObjectKind.SNAPSHOT, ms, ms, pre, post)
    if m := _SEGMENT_RE.match(key):
        first, last = int(m["first"], 16), int(m["last"], 16)
        if last < first:
            return None
        return ObjectName(
            first,
            last,
            int(m["level"]),
            ObjectKind.SEGMENT,
            int(m["min"]),
            int(m["max"]),
            _checksum_field(m["pre"]),
            _checksum_field(m["post"]),
        )
    return None


def _checksum_field(text: str | None) -> int:
    return NO_CHECKSUM if text is None else int(text, 16)


def _check_checksum(value: int) -> None:
    if not (value == NO_CHECKSUM or 0 <= value < 2**64):
        raise ValueError(f"database checksum {value} out of range")


def _check_txid(txid: int) -> None:
    if not 0 < txid <= _MAX_TXID:
        raise ValueError(f"TXID {txid} out of range 1..2**64-1")


def _check_ms(ms: int) -> None:
    if not 0 <= ms <= _MAX_MS:
        raise ValueError(f"timestamp {ms} ms out of range")
