"""Replay: a scratch copy of a replica's database, moved forward one transaction at a time.

`replicad find` and `replicad log` need the database as it was after each transaction of a
range.  Restoring every state from nothing would cost a whole restore per transaction; instead
the state before the range is restored once (restore.py plans and applies it), and then each
transaction after it is written onto that copy in place, page by page, as the verifying decoder
(format.py) returns them.  Only level-0 segments are stepped through: they keep every
transaction apart, while a compacted segment holds its pages under its last transaction only.

Memory is one decoded block and the page numbers of one transaction; the scratch copy costs the
database's size on disk.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

from replicad.clients.base import ReplicaClient
from replicad.errors import FormatError, RestoreError
from replicad.format import DecodeEvent, ObjectDecoder, PageEvent, TxnEndEvent, TxnInfo
from replicad.position import SEGMENT_PREFIX, SNAPSHOT_PREFIX, ObjectKind, ObjectName
from replicad.restore import empty_replica_error, make_plan, names_from_listing, restore

_LEVEL0 = f"{SEGMENT_PREFIX}00/"


@dataclass(frozen=True, slots=True)
class TxidRange:
    """Transactions `base_txid + 1 .. last_txid`, replayed from the state after `base_txid`."""

    base_txid: int
    last_txid: int

    @property
    def count(self) -> int:
        """Transactions in the range."""
        return self.last_txid - self.base_txid


@dataclass(frozen=True, slots=True)
class Step:
    """One transaction just applied to the scratch copy."""

    info: TxnInfo
    #: Distinct page numbers it wrote, ascending.
    pages: tuple[int, ...]
    #: The database's size in pages before it.
    db_pages_before: int


async def resolve_range(
    client: ReplicaClient,
    *,
    from_txid: int | None = None,
    to_txid: int | None = None,
    since_ns: int | None = None,
    until_ns: int | None = None,
) -> TxidRange:
    """The TXID range that `--from-txid/--since` and `--to-txid/--until` name.

    Without a start, the range starts after the oldest snapshot (the oldest state the replica
    can rebuild); without an end, it ends at the newest transaction.  Raises `RestoreError` for
    an empty replica, a start older than every snapshot, or an empty range, saying which.
    """
    if since_ns is not None and until_ns is not None and since_ns > until_ns:
        raise RestoreError("--since is after --until: the range is empty")
    snapshots = names_from_listing(await client.list_objects(SNAPSHOT_PREFIX))
    if not snapshots:
        raise empty_replica_error()
    oldest = min(n.last_txid for n in snapshots)
    newest = (await make_plan(client)).target_txid
    if from_txid is not None:
        base = from_txid - 1
    elif since_ns is not None:
        base = await _committed_before(client, since_ns, oldest)
    else:
        base = oldest
    if base < oldest:
        raise RestoreError(
            f"TXID {base + 1} is before the oldest state the replica holds",
            hint=f"start at --from-txid {oldest + 1} or later (the oldest snapshot is TXID "
            f"{oldest}); older history was removed by retention",
        )
    last = newest if to_txid is None else min(to_txid, newest)
    if until_ns is not None:
        last = min(last, await _committed_at(client, until_ns, base))
    if last <= base:
        raise RestoreError(
            f"no transaction in the range: it starts after TXID {base} and ends at TXID {last}",
            hint=f"the replica holds TXIDs {oldest + 1}..{newest} after its oldest snapshot; "
            "`replicad log URL` lists them with their commit times",
        )
    return TxidRange(base, last)


async def _committed_before(client: ReplicaClient, at_ns: int, oldest: int) -> int:
    """The last TXID committed before `at_ns`; `oldest` if none (the range starts earlier)."""
    try:
        return max(oldest, (await make_plan(client, at_ns=at_ns - 1)).target_txid)
    except RestoreError:
        return oldest


async def _committed_at(client: ReplicaClient, at_ns: int, base: int) -> int:
    """The last TXID committed at or before `at_ns`; `base` if none."""
    try:
        return (await make_plan(client, at_ns=at_ns)).target_txid
    except RestoreError:
        return base


class Replay:
    """The database at `txid`, in a scratch file at `path`, stepped forward by `steps`.

    States: created, then `start` restores the base state, then `steps` moves forward once.
    The scratch file is the caller's to remove.
    """

    def __init__(self, client: ReplicaClient, path: Path) -> None:
        self.client = client
        self.path = path
        self.txid = 0
        self.page_size = 0
        self.db_pages = 0
        #: Bytes downloaded for the base state and for the transactions after it.
        self.base_bytes = 0
        self.step_bytes = 0

    async def start(self, base_txid: int) -> None:
        """Restore the state right after `base_txid` into the scratch file."""
        before = self.client.stats.bytes_downloaded
        result = await restore(self.client, self.path, target_txid=base_txid, force=True)
        self.base_bytes = self.client.stats.bytes_downloaded - before
        self.txid, self.page_size, self.db_pages = result.txid, result.page_size, result.db_pages

    async def steps(self, last_txid: int) -> AsyncGenerator[Step, None]:
        """Apply each transaction up to `last_txid` in turn; yield after each one is applied.

        The scratch file holds exactly the state after `Step.info.txid` while the caller has it.
        """
        chain = level0_chain(await self._level0(last_txid), self.txid, last_txid)
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            for name in chain:
                # Closed here, not by the garbage collector, when the caller stops early: the
                # download inside must be closed before this generator is.
                async with contextlib.aclosing(self._apply(fd, name, last_txid)) as steps:
                    async for step in steps:
                        yield step
        finally:
            os.close(fd)

    async def _level0(self, last_txid: int) -> list[ObjectName]:
        end = f"{_LEVEL0}{last_txid + 1:016x}"
        return list(names_from_listing(await self.client.list_objects(_LEVEL0, end_before=end)))

    async def _apply(self, fd: int, name: ObjectName, last_txid: int) -> AsyncGenerator[Step, None]:
        decoder = ObjectDecoder(expected=name)
        written: set[int] = set()
        before = self.client.stats.bytes_downloaded
        chunks = self.client.iter_object(name.key)
        try:
            async for chunk in chunks:
                for event in _events(decoder, chunk, name):
                    if type(event) is PageEvent:
                        if self.txid < event.txid <= last_txid:
                            self._write(fd, event.pgno, event.data)
                            written.add(event.pgno)
                    elif type(event) is TxnEndEvent and self.txid < event.info.txid <= last_txid:
                        step = self._end_transaction(fd, event.info, written)
                        written = set()
                        yield step
                        if self.txid == last_txid:
                            return
            _close(decoder, name)
        finally:
            self.step_bytes += self.client.stats.bytes_downloaded - before
            if isinstance(chunks, AsyncGenerator):
                await chunks.aclose()  # releases the connection when the caller stops early

    def _write(self, fd: int, pgno: int, data: bytes) -> None:
        if len(data) != self.page_size:
            raise RestoreError(f"objects disagree on page size ({self.page_size}, {len(data)})")
        os.pwrite(fd, data, (pgno - 1) * self.page_size)

    def _end_transaction(self, fd: int, info: TxnInfo, written: set[int]) -> Step:
        if info.txid != self.txid + 1:
            raise RestoreError(f"level 0 skips from TXID {self.txid} to {info.txid}")
        before = self.db_pages
        if info.db_pages != before:
            # Shrunk: cut.  Grown: a page of the new size may not have been written (a freelist
            # page at the end), and the file must still be the size SQLite says it is.
            os.ftruncate(fd, info.db_pages * self.page_size)
        self.txid, self.db_pages = info.txid, info.db_pages
        return Step(info, tuple(sorted(written)), before)


@contextlib.asynccontextmanager
async def scratch_replay(
    client: ReplicaClient, base_txid: int, *, parent: Path | None = None
) -> AsyncIterator[Replay]:
    """A started `Replay` in a private temporary directory under `parent` (default: the
    system's), removed on exit.
    """
    with tempfile.TemporaryDirectory(prefix="replicad-replay-", dir=parent) as scratch:
        replay = Replay(client, Path(scratch) / "scratch.db")
        await replay.start(base_txid)
        yield replay


def level0_chain(names: Iterable[ObjectName], after: int, last: int) -> list[ObjectName]:
    """The level-0 segments holding TXIDs `after + 1 .. last`, in order. Pure.

    Raises `RestoreError` naming the last TXID reachable when a segment is missing (retention
    keeps only compacted segments for old history, or an upload never happened).
    """
    segments = sorted(n for n in names if n.kind is ObjectKind.SEGMENT and n.level == 0)
    chain: list[ObjectName] = []
    reached = after
    while reached < last:
        candidates = [n for n in segments if n.first_txid <= reached + 1 <= n.last_txid]
        if not candidates:
            raise RestoreError(
                f"the replica has no level-0 segment holding TXID {reached + 1}",
                hint=f"transactions can be stepped through up to TXID {reached} only; older "
                "history may be kept compacted, which holds whole ranges, not transactions",
            )
        best = max(candidates, key=lambda n: n.last_txid)
        chain.append(best)
        reached = best.last_txid
    return chain


def _events(decoder: ObjectDecoder, chunk: bytes, name: ObjectName) -> list[DecodeEvent]:
    try:
        return decoder.feed(chunk)
    except FormatError as exc:
        raise _damaged(name, exc) from exc


def _close(decoder: ObjectDecoder, name: ObjectName) -> None:
    try:
        decoder.close()
    except FormatError as exc:
        raise _damaged(name, exc) from exc


def _damaged(name: ObjectName, exc: FormatError) -> FormatError:
    return FormatError(
        f"{name.key} is damaged: {exc.message}",
        hint=f"states up to TXID {name.first_txid - 1} can still be examined",
    )
