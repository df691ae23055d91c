"""Follow mode: a restored database that keeps applying the replica's new objects.

`replicad restore --follow -o OUT` restores the newest state, then polls the replica and applies
each new segment as it appears: a warm standby, or a read replica on another host.

Every step is proven (format v2, DESIGN.md section 9).  The follower keeps a table of page
hashes of the *source's* state at its TXID; the next object must start at the next TXID with a
`pre_checksum` equal to that state's checksum, and the state after each of its transactions must
equal the checksum its trailer records.  An object that fails is never committed to OUT.

**Readers stay safe because OUT is written only through SQLite.**  OUT is a WAL-mode database,
and each object is applied in one write transaction on SQLite's `sqlite_dbpage` virtual table,
which writes raw pages through the pager: the new pages go to OUT-wal and become visible
atomically at COMMIT, readers that began before keep their snapshot (WAL read marks), and
checkpoints never copy past a reader's snapshot.  So a reader with the ordinary `sqlite3`
library sees a committed state of the source at every moment and its transactions are never
broken.  The standard library's SQLite is not built with `SQLITE_ENABLE_DBPAGE_VTAB`; the
`sqlean.py` package bundles one that is (see docs/design.md, "Follow mode").

SQLite stamps page 1's change counter and version fields (bytes 24-27 and 92-99) at each WAL
commit, so OUT's page 1 differs from the source's in those 12 bytes, which carry no data.  The
page-hash table holds the source's page 1, and the follow state file keeps the source's 12
bytes, so a restarted follower proves OUT equals the source's state at its TXID before it goes
on (and restores afresh if not).

New objects are found without LIST in steady state: the daemon keeps a small `tip.json` naming
its newest objects (replicad/tip.py), one GET per poll.  When the tip does not lead on from the
follower's state, the follower lists the keys after its TXID once; when even the listing has no
chain from its state to the replica's newest (a takeover, a replaced database, or objects it
needed were deleted while it was down), it says so and restores the newest state into OUT in
one write transaction: a new lineage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog

from replicad.checksum import PageHashes
from replicad.clients.base import ReplicaClient
from replicad.errors import (
    FormatError,
    ObjectNotFoundError,
    ReplicadError,
    ReplicaError,
    RestoreError,
    StateError,
)
from replicad.format import Transaction, decode_object
from replicad.position import SEGMENT_PREFIX, SNAPSHOT_PREFIX, ObjectKind, ObjectName
from replicad.private import write_private
from replicad.restore import make_plan, restore
from replicad.tip import TIP_KEY, decode_tip

if TYPE_CHECKING:
    import sqlite3

#: Seconds between polls of the replica's tip (one GET each).
DEFAULT_FOLLOW_INTERVAL: Final = 0.25
#: Seconds between the follower's "following" log lines (TXID, lag, requests).
_REPORT_EVERY: Final = 60.0
#: Most seconds between retries after a failed step.
_MAX_BACKOFF: Final = 10.0
#: Page 1 byte ranges SQLite rewrites at each commit (change counter; version-valid-for and
#: SQLite version number), which OUT therefore cannot share with the source.
_STAMPED: Final = ((24, 28), (92, 100))
_STATE_VERSION: Final = 1

log = structlog.get_logger()


def state_path(output: Path) -> Path:
    """The follow state file kept beside OUT while it is a follower's copy."""
    return output.with_name(output.name + ".replicad-follow")


def promoted_path(output: Path) -> Path:
    """Where a promoted copy's last follow state is kept, as a record."""
    return output.with_name(output.name + ".replicad-promoted")


@dataclass(frozen=True, slots=True)
class FollowState:
    """Where a follower's OUT stands, saved after each applied object (owner-only file)."""

    url: str
    txid: int
    checksum: int
    page_size: int
    db_pages: int
    #: The source's page-1 bytes at `_STAMPED`, hex (OUT's own differ; see the module doc).
    stamped: str
    pid: int

    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves the old state or the new one."""
        doc = asdict(self) | {"version": _STATE_VERSION, "checksum": f"{self.checksum:016x}"}
        try:
            write_private(path, [json.dumps(doc).encode()])
        except OSError as exc:
            raise StateError(f"cannot save the follow state {path}: {exc.strerror}") from exc

    @classmethod
    def load(cls, path: Path) -> FollowState | None:
        """The saved state, or None when there is none or it cannot be read."""
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
            if doc.pop("version") != _STATE_VERSION:
                return None
            doc["checksum"] = int(doc["checksum"], 16)
            return cls(**doc)
        except (OSError, ValueError, KeyError, TypeError):
            return None


def stamped_bytes(page1: bytes) -> bytes:
    """The bytes of page 1 that SQLite stamps at each commit."""
    return b"".join(page1[a:b] for a, b in _STAMPED)


def with_stamped(page1: bytes, stamped: bytes) -> bytes:
    """Page 1 with the stamped bytes replaced by `stamped` (see `stamped_bytes`)."""
    out = bytearray(page1)
    at = 0
    for a, b in _STAMPED:
        out[a:b] = stamped[at : at + b - a]
        at += b - a
    return bytes(out)


class OutputDatabase:
    """OUT, written only through SQLite: `sqlite_dbpage` in one write transaction per change.

    Blocking; the follower calls it from a worker thread, one call at a time.
    """

    def __init__(self, path: Path) -> None:
        try:
            import sqlean  # type: ignore[import-untyped]  # noqa: PLC0415 - only follow needs it
        except ImportError as exc:  # pragma: no cover - a dependency; defensive for packagers
            raise ReplicadError(
                "follow mode needs the sqlean.py package (SQLite with sqlite_dbpage)",
                hint="pip install sqlean.py",
            ) from exc
        self.path = path
        self._sqlite_error: type[Exception] = sqlean.Error
        conn: sqlite3.Connection = sqlean.connect(
            str(path), isolation_level=None, timeout=30, check_same_thread=False
        )
        self.conn = conn
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")

    def pages(self) -> Iterator[tuple[int, bytes]]:
        """Every page of the committed state, in order (read through SQLite: WAL included)."""
        self.conn.execute("BEGIN")
        try:
            yield from self.conn.execute("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno")
        finally:
            self.conn.execute("COMMIT")

    def write(self, pages: Iterable[tuple[int, bytes]], *, truncate_to: int | None) -> None:
        """Cut the database to `truncate_to` pages (if given), then write `pages`: one commit."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except self._sqlite_error as exc:
            raise self._error(exc) from exc
        try:
            if truncate_to is not None:
                # Inserting NULL at page N drops page N and every page after it.
                conn.execute(
                    "INSERT INTO sqlite_dbpage(pgno, data) VALUES (?, NULL)", (truncate_to + 1,)
                )
            conn.executemany("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?, ?)", pages)
            conn.execute("COMMIT")
        except BaseException as exc:
            conn.execute("ROLLBACK")
            if isinstance(exc, self._sqlite_error):
                raise self._error(exc) from exc
            raise

    def _error(self, exc: Exception) -> RestoreError:
        return RestoreError(
            f"cannot write {self.path} through SQLite: {exc}",
            hint="nothing else may write the follower's copy (readers are fine); the step is "
            "retried",
        )

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and empty it (waits for readers)."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        """Close the connection (SQLite checkpoints if no other connection is open)."""
        self.conn.close()


@dataclass(frozen=True, slots=True)
class _Restored:
    """A state restored to a file: its TXID, page hashes and page-1 stamps."""

    txid: int
    table: PageHashes
    stamped: bytes


class _Changes:
    """An object's transactions folded into the pages to write and the size to cut to."""

    def __init__(self, db_pages: int) -> None:
        self.pages: dict[int, bytes] = {}
        self.truncate_to: int | None = None
        self._size = db_pages

    def add(self, txn: Transaction) -> None:
        for pgno, data in txn.pages:
            self.pages[pgno] = data
        size = txn.info.db_pages
        if size < self._size:
            self.truncate_to = size if self.truncate_to is None else min(self.truncate_to, size)
            for pgno in [p for p in self.pages if p > size]:
                del self.pages[pgno]
        self._size = size

    def sorted_pages(self) -> list[tuple[int, bytes]]:
        return sorted(self.pages.items())


class Follower:
    """Keeps OUT at the replica's newest state, one proven object at a time."""

    def __init__(
        self,
        client: ReplicaClient,
        output: Path,
        *,
        interval: float = DEFAULT_FOLLOW_INTERVAL,
        force: bool = False,
        integrity: str = "quick",
    ) -> None:
        self.client = client
        self.output = output.absolute()
        self.interval = interval
        self.force = force
        self.integrity = integrity
        self.log = log.bind(follower=str(self.output))
        self.txid = 0
        self.table: PageHashes | None = None
        self.stamped = bytes(12)
        self.out: OutputDatabase | None = None
        self.applied_objects = 0
        #: Commit time (Unix ns) of the newest transaction applied.
        self.applied_time_ns = 0
        self._warned_no_tip = False

    @property
    def checksum(self) -> int:
        """The source's database checksum at `txid`."""
        return 0 if self.table is None else self.table.checksum

    # -- start ------------------------------------------------------------------------------

    async def wait_for_replica(self, stop: asyncio.Event) -> bool:
        """Wait until the replica holds a snapshot (a standby may start before the primary's
        first upload); False when `stop` was set first.  One LIST per second meanwhile; none
        when OUT exists already (a restart resumes from it).
        """
        if self.output.exists():
            return True
        warned = False
        while not await self.client.list_objects(SNAPSHOT_PREFIX):
            if not warned:
                self.log.info("the replica is empty; waiting for its first snapshot")
                warned = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(self.interval, 1.0))
            if stop.is_set():
                return False
        return True

    async def start(self) -> None:
        """Restore OUT, or resume from its follow state when that proves OUT's content."""
        state_file = state_path(self.output)
        if not self.output.exists():
            await self._first_restore()
            return
        state = FollowState.load(state_file)
        if state is None and not self.force:
            raise RestoreError(
                f"{self.output} exists and is not a follower's copy (no {state_file.name})",
                hint="choose another -o, or --force to replace it (through SQLite, so its "
                "readers see the switch atomically); a promoted copy is never followed again",
            )
        self.out = await asyncio.to_thread(OutputDatabase, self.output)
        if state is not None and state.url == self.client.url:
            if await asyncio.to_thread(self._resume, state):
                self.log.info(
                    "resumed following", txid=self.txid, checksum=f"{state.checksum:016x}"
                )
                return
            self.log.warning(
                "OUT does not match its follow state (changed, or killed mid-step); "
                "restoring the newest state",
                txid=state.txid,
            )
        await self._restore_newest("replacing OUT with the replica's newest state")

    async def _first_restore(self) -> None:
        """Restore beside OUT, save the follow state, then move the file into place: a kill at
        any point leaves no OUT (a fresh start) or an OUT with its state (a resume).
        """
        tmp = self._beside()
        try:
            self._adopt(await self._restore_to(tmp))
            self._save_state()
            # A -wal left from an earlier file of that name must not be applied to this one.
            _remove_database(self.output)
            await asyncio.to_thread(os.replace, tmp, self.output)
        finally:
            _remove_database(tmp)
        self.out = await asyncio.to_thread(OutputDatabase, self.output)
        self.log.info("restored; following", txid=self.txid, checksum=_hex(self.checksum))

    def _beside(self) -> Path:
        return self.output.with_name(f".{self.output.name}.follow-restore")

    async def _restore_to(self, path: Path) -> _Restored:
        """Restore the newest state to `path`; its page hashes, proven equal to the source's."""
        result = await restore(self.client, path, force=True, integrity=self.integrity)
        table, stamped = await asyncio.to_thread(
            _table_of_file, path, result.page_size, result.db_pages
        )
        restored = _Restored(result.txid, table, stamped)
        self._check_proven(restored, result.checksum)
        return restored

    def _resume(self, state: FollowState) -> bool:
        assert self.out is not None
        stamped = bytes.fromhex(state.stamped)
        table = PageHashes(state.page_size)
        for pgno, data in self.out.pages():
            table.set_page(pgno, with_stamped(data, stamped) if pgno == 1 else data)
        if table.checksum != state.checksum or table.db_pages != state.db_pages:
            return False
        self.table, self.stamped, self.txid = table, stamped, state.txid
        return True

    def _adopt(self, restored: _Restored) -> None:
        self.table, self.stamped, self.txid = restored.table, restored.stamped, restored.txid

    def _check_proven(self, restored: _Restored, proven: int | None) -> None:
        table = restored.table
        if proven is None:
            raise RestoreError(
                f"{self.client.url} records no database checksums (format v1), so following it "
                "could not prove each step",
                hint="upgrade the replicating daemon (format v2); a plain restore still works",
            )
        if table.checksum != proven:
            raise RestoreError(
                f"{self.output}: the restored file's checksum {table.checksum:016x} is not the "
                f"source's {proven:016x}",
                hint="the file was changed while restoring; run the follower again",
            )

    async def _restore_newest(self, why: str) -> None:
        """Restore the newest state beside OUT, then copy it into OUT in one transaction."""
        self.log.warning(why, txid=self.txid)
        old_pages = self.table.db_pages if self.table is not None else None
        tmp = self._beside()
        try:
            restored = await self._restore_to(tmp)
            await asyncio.to_thread(self._copy_into_out, tmp, restored.table, old_pages)
            self._adopt(restored)
        finally:
            _remove_database(tmp)
        self._save_state()
        self.log.warning(
            "now following a new lineage", txid=self.txid, checksum=f"{self.checksum:016x}"
        )

    def _copy_into_out(self, source: Path, table: PageHashes, old_pages: int | None) -> None:
        """Copy a restored file into OUT in one write transaction."""
        assert self.out is not None
        page_size, db_pages = table.page_size, table.db_pages
        current = old_pages if old_pages is not None else _page_count(self.out)
        out_size = self.out.conn.execute("PRAGMA page_size").fetchone()[0]
        if out_size != page_size:
            raise RestoreError(
                f"the replica's page size is now {page_size}, {self.output} has {out_size}",
                hint="stop the readers of OUT and restore it afresh (another -o, or remove it)",
            )
        self.out.write(
            _file_pages(source, page_size, db_pages),
            truncate_to=db_pages if db_pages < current else None,
        )

    # -- steps ------------------------------------------------------------------------------

    async def step(self) -> int:
        """One poll: apply every new object found. Returns the number applied."""
        tip = await self._read_tip()
        if tip is not None:
            applied = await self._follow(tip)
            end = _newest(tip)
            if end is None or end.last_txid < self.txid or self._at(end):
                return applied
        else:
            applied = 0
        listed = await self._list_after()
        applied += await self._follow(listed)
        if any(n.last_txid > self.txid for n in listed) or (tip and not self._tip_settled(tip)):
            applied += await self._maybe_new_lineage()
        return applied

    def _at(self, name: ObjectName) -> bool:
        return name.last_txid == self.txid and name.post == self.checksum

    def _tip_settled(self, tip: Sequence[ObjectName]) -> bool:
        end = _newest(tip)
        return end is None or end.last_txid < self.txid or self._at(end)

    async def _read_tip(self) -> list[ObjectName] | None:
        try:
            data = await self.client.get_object(TIP_KEY)
        except ObjectNotFoundError:
            if not self._warned_no_tip:
                self.log.warning(
                    "the replica has no tip.json (its daemon predates follow mode); "
                    "following by listing, one LIST per poll"
                )
                self._warned_no_tip = True
            return None
        return decode_tip(data)

    async def _list_after(self) -> list[ObjectName]:
        """Level-0 segments and snapshots after our TXID (a bounded listing)."""
        after = f"{self.txid:016x}~"  # '~' sorts after every character of a key's TXID field
        found: list[ObjectName] = []
        for prefix in (f"{SEGMENT_PREFIX}00/", SNAPSHOT_PREFIX):
            infos = await self.client.list_objects(prefix, start_after=prefix + after)
            found += _names(info.key for info in infos)
        return found

    async def _follow(self, candidates: Sequence[ObjectName]) -> int:
        applied = 0
        while (name := self._next(candidates)) is not None:
            try:
                data = await self.client.get_object(name.key)
            except ObjectNotFoundError:
                return applied  # deleted since it was named: the listing path finds the rest
            await asyncio.to_thread(self._apply, name, data)
            applied += 1
        return applied

    def _next(self, candidates: Sequence[ObjectName]) -> ObjectName | None:
        fits = [
            n
            for n in candidates
            if n.kind is ObjectKind.SEGMENT
            and n.level == 0
            and n.chained
            and n.first_txid == self.txid + 1
            and n.pre == self.checksum
        ]
        return max(fits, key=lambda n: n.last_txid, default=None)

    def _apply(self, name: ObjectName, data: bytes) -> None:
        """Verify one segment against our state and commit it to OUT (worker thread)."""
        assert self.table is not None
        assert self.out is not None
        header, txns = decode_object(data, expected=name)
        if header.page_size != self.table.page_size:
            raise FormatError(f"{name.key}: page size {header.page_size} is not the database's")
        trial = self.table.copy()
        changes = _Changes(trial.db_pages)
        for txn in txns:
            for pgno, page in txn.pages:
                trial.set_page(pgno, page)
            trial.set_size(txn.info.db_pages)
            changes.add(txn)
            if txn.checksum is not None and trial.checksum != txn.checksum:
                raise FormatError(
                    f"{name.key}: the database checksum after TXID {txn.info.txid} is "
                    f"{trial.checksum:016x}, but the object records {txn.checksum:016x}",
                    hint="the object is damaged or foreign; `replicad verify` names it",
                )
        self.out.write(changes.sorted_pages(), truncate_to=changes.truncate_to)
        self.table, self.txid = trial, name.last_txid
        if 1 in changes.pages:
            self.stamped = stamped_bytes(changes.pages[1])
        self.applied_objects += 1
        self.applied_time_ns = txns[-1].info.commit_time_ns if txns else self.applied_time_ns
        self._save_state()
        self.log.debug("applied", key=name.key, txid=self.txid)

    async def _maybe_new_lineage(self) -> int:
        """Newer objects exist that do not continue our state: restore the newest if the
        replica's newest state is not ours.
        """
        plan = await make_plan(self.client)
        if self._at(plan.objects[-1]):
            return 0
        await self._restore_newest(
            f"the replica's history does not continue this copy at TXID {self.txid} (a takeover, "
            "a replaced database, a daemon restart that had to snapshot, or objects this copy "
            f"needed were deleted): restoring TXID {plan.target_txid} (new lineage)"
        )
        return 1

    def _save_state(self) -> None:
        assert self.table is not None
        FollowState(
            url=self.client.url,
            txid=self.txid,
            checksum=self.table.checksum,
            page_size=self.table.page_size,
            db_pages=self.table.db_pages,
            stamped=self.stamped.hex(),
            pid=os.getpid(),
        ).save(state_path(self.output))

    # -- loop -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Step every `interval` until `stop` is set; failures are logged and retried."""
        failures = 0
        next_report = time.monotonic() + _REPORT_EVERY
        while not stop.is_set():
            try:
                await self.step()
                failures = 0
            except (ReplicaError, FormatError, RestoreError) as exc:
                failures += 1
                self.log.error("follow step failed; retrying", error=str(exc), failures=failures)
            if time.monotonic() >= next_report:
                next_report += _REPORT_EVERY
                self._report()
            delay = self.interval if not failures else min(_MAX_BACKOFF, 0.5 * 2**failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    def _report(self) -> None:
        """A periodic line: where the copy stands and what following has cost so far."""
        self.log.info(
            "following",
            txid=self.txid,
            # Grows while the source is idle too: compare it with the source's commit rate.
            newest_commit_age_seconds=round(self.newest_commit_age(), 3),
            objects_applied=self.applied_objects,
            requests=dict(self.client.stats.requests),
        )

    async def close(self) -> None:
        """Stop following: OUT stays at the last committed state, its follow state saved."""
        if self.out is not None:
            await asyncio.to_thread(self.out.close)
            self.out = None

    async def promote(self) -> None:
        """Leave OUT for an application to write: checkpointed, and never followed again."""
        if self.out is not None:
            await asyncio.to_thread(self.out.checkpoint)
        await self.close()
        # Kept as a record of where the copy was promoted; a follower never resumes from it.
        state_path(self.output).replace(promoted_path(self.output))
        self.log.info("promoted: OUT is no longer a follower's copy", txid=self.txid)

    def newest_commit_age(self) -> float:
        """Seconds since the source committed the newest transaction applied (0 before any)."""
        if not self.applied_time_ns:
            return 0.0
        return max(0.0, (time.time_ns() - self.applied_time_ns) / 1e9)


def _hex(checksum: int) -> str:
    return f"{checksum:016x}"


def _names(keys: Iterable[str]) -> list[ObjectName]:
    from replicad.position import parse_key  # noqa: PLC0415

    return [n for n in map(parse_key, keys) if n is not None]


def _newest(names: Sequence[ObjectName]) -> ObjectName | None:
    return max(names, key=lambda n: (n.last_txid, n.kind is ObjectKind.SEGMENT), default=None)


def _file_pages(path: Path, page_size: int, db_pages: int) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for pgno in range(1, db_pages + 1):
            yield pgno, f.read(page_size).ljust(page_size, b"\0")


def _table_of_file(path: Path, page_size: int, db_pages: int) -> tuple[PageHashes, bytes]:
    table = PageHashes(page_size)
    stamped = bytes(12)
    for pgno, data in _file_pages(path, page_size, db_pages):
        table.set_page(pgno, data)
        if pgno == 1:
            stamped = stamped_bytes(data)
    table.set_size(db_pages)
    return table, stamped


def _remove_database(path: Path) -> None:
    for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        each.unlink(missing_ok=True)


def _page_count(out: OutputDatabase) -> int:
    return int(out.conn.execute("PRAGMA page_count").fetchone()[0])


def promote_output(output: Path, *, timeout: float) -> int:
    """Promote OUT: signal its running follower (SIGUSR1: catch up once, then finish) and wait,
    or finish it here when none runs.  Returns the TXID OUT holds.
    """
    path = state_path(output)
    state = FollowState.load(path)
    if state is None:
        raise RestoreError(
            f"{output} is not a follower's copy (no readable {path.name})",
            hint="it may already be promoted; an application can open it",
        )
    if _is_follower(state.pid):
        os.kill(state.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while path.exists() and _is_follower(state.pid):
            if time.monotonic() > deadline:
                raise RestoreError(
                    f"the follower (pid {state.pid}) did not finish within {timeout:g} s",
                    hint="see its log; promote again with a longer --timeout",
                )
            time.sleep(0.05)
        if (promoted := FollowState.load(promoted_path(output))) is not None:
            return promoted.txid
    out = OutputDatabase(output)
    try:
        out.checkpoint()
    finally:
        out.close()
    path.replace(promoted_path(output))
    return state.txid


def _is_follower(pid: int) -> bool:
    """Whether `pid` is a running replicad process (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"replicad" in cmdline
