"""`replicad verify`: prove a replica's history without writing a database.

Every object of the chain that restores the target (the newest state by default) is downloaded,
decoded (which checks its block CRCs and trailer) and applied to a table of page hashes: 8 bytes
a page, never the pages themselves.  Each database checksum an object records (before it, after
each of its transactions, after it; format v2) must equal the state built so far, so a
corrupt, truncated, missing or foreign object is found and named, and a verified replica is
proven to restore the source's state byte for byte.  Given the live database, its checksum is
compared with the replica's newest state too (equal when the application has not written since).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from replicad.checksum import PageHashes
from replicad.clients.base import ReplicaClient
from replicad.errors import FormatError, RestoreError
from replicad.format import EndEvent, ObjectDecoder, ObjectHeader, PageEvent, TxnEndEvent
from replicad.position import ObjectKind, ObjectName, parse_key
from replicad.restore import RestorePlan, make_plan, restore


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What `verify_replica` proved."""

    url: str
    target_txid: int
    objects: int
    bytes: int
    #: The database checksum of the state at `target_txid`, computed from the pages.
    checksum: int
    #: Recorded checksums compared (0 for a format v1 replica, which records none).
    checks: int
    #: Objects that record no checksums (format v1): their place in the history is unproven.
    unproven: tuple[str, ...]
    warnings: tuple[str, ...]
    seconds: float
    #: The live database's checksum, when one was compared (see `compare_live`).
    live_checksum: int | None = None
    problems: list[str] = field(default_factory=list)
    #: True when the drill also restored the state to a file (`drill_restore`).
    restored: bool = False

    @property
    def ok(self) -> bool:
        """True when everything checked agreed."""
        return not self.problems


class _Chain:
    """The page hashes of the state the objects applied so far build, checked as it goes."""

    def __init__(self, plan: RestorePlan, spill_dir: Path | None) -> None:
        self.plan = plan
        self.spill_dir = spill_dir
        self.table: PageHashes | None = None
        self.checks = 0
        self._after: list[int] = []  # checksum after each transaction of the current object

    def begin(self, name: ObjectName, header: ObjectHeader) -> None:
        if name.kind is ObjectKind.SNAPSHOT:
            self.table = PageHashes(header.page_size, spill_dir=self.spill_dir)
        elif header.chained:
            self._expect(name, "before it", header.pre_checksum)
        self._after = []

    def page(self, event: PageEvent) -> None:
        if event.txid <= self.plan.target_txid:
            self._table().set_page(event.pgno, event.data)

    def end_transaction(self, event: TxnEndEvent) -> None:
        if event.info.txid <= self.plan.target_txid:
            self._table().set_size(event.info.db_pages)
            self._after.append(self._table().checksum)

    def end(self, name: ObjectName, header: ObjectHeader, event: EndEvent) -> None:
        recorded = event.checksums
        if recorded is None:
            return
        if name.level == 0:  # every transaction carries its own pages: check each one
            for txid, (actual, wanted) in enumerate(zip(self._after, recorded, strict=False)):
                self._compare(name, f"after TXID {name.first_txid + txid}", actual, wanted)
        elif name.last_txid <= self.plan.target_txid:  # its pages sit on its last transaction
            self._expect(name, f"after TXID {name.last_txid}", header.post_checksum)

    def _expect(self, name: ObjectName, where: str, wanted: int | None) -> None:
        if wanted is not None:
            self._compare(name, where, self._table().checksum, wanted)

    def _compare(self, name: ObjectName, where: str, actual: int, wanted: int) -> None:
        self.checks += 1
        if actual != wanted:
            raise FormatError(
                f"{name.key}: the database checksum {where} is {actual:016x}, but the object "
                f"records {wanted:016x}: it does not continue the history before it",
                hint="the object is damaged or belongs to another history; restore an earlier "
                f"--txid than {name.first_txid} or use another replica",
            )

    def _table(self) -> PageHashes:
        if self.table is None:
            raise FormatError("the chain does not start with a snapshot")
        return self.table


async def verify_replica(
    client: ReplicaClient, *, target_txid: int | None = None, spill_dir: Path | None = None
) -> VerifyReport:
    """Prove the chain to `target_txid` (default: the newest state); raises `FormatError`
    naming the first object that does not verify, `RestoreError` when no chain reaches it.
    """
    started = time.monotonic()
    plan = await make_plan(client, target_txid=target_txid)
    chain = _Chain(plan, spill_dir)
    unproven = []
    for name in plan.objects:
        try:
            await _apply(client, chain, name)
        except FormatError as exc:
            raise FormatError(f"{name.key} in {client.url}: {exc.message}", hint=exc.hint) from exc
        if not name.chained:
            unproven.append(name.key)
    table = chain.table
    assert table is not None
    return VerifyReport(
        url=client.url,
        target_txid=plan.target_txid,
        objects=len(plan.objects),
        bytes=plan.total_bytes,
        checksum=table.checksum,
        checks=chain.checks,
        unproven=tuple(unproven),
        warnings=plan.warnings,
        seconds=time.monotonic() - started,
    )


async def _apply(client: ReplicaClient, chain: _Chain, name: ObjectName) -> None:
    """Download one object and apply it to the chain's page hashes, checking as it goes."""
    decoder = ObjectDecoder(expected=name)
    header: ObjectHeader | None = None
    async for chunk in client.iter_object(name.key):
        events = decoder.feed(chunk)
        if header is None and decoder.header is not None:
            header = decoder.header
            chain.begin(name, header)
        for event in events:
            if type(event) is PageEvent:
                chain.page(event)
            elif type(event) is TxnEndEvent:
                chain.end_transaction(event)
            elif type(event) is EndEvent:
                assert header is not None
                chain.end(name, header, event)
    decoder.close()


async def compare_live(report: VerifyReport, db_path: Path) -> VerifyReport:
    """Compare the live database's checksum with the verified newest state's."""
    from replicad.db import Database  # noqa: PLC0415 - only this path opens a database

    def live_checksum() -> int:
        db = Database(db_path)
        db.open()
        try:
            source = db.start_fresh(base_txid=0)
            return db.page_hashes(source).checksum
        finally:
            db.close()

    checksum = await asyncio.to_thread(live_checksum)
    problems = list(report.problems)
    if checksum != report.checksum:
        problems.append(
            f"the live database {db_path} (checksum {checksum:016x}) differs from the replica's "
            f"TXID {report.target_txid} ({report.checksum:016x}): it has changed since (the "
            "daemon ships it within a second), or the replica does not hold what it wrote"
        )
    return dataclasses.replace(report, live_checksum=checksum, problems=problems)


# -- drills -----------------------------------------------------------------------------------


async def drill_restore(
    client: ReplicaClient, *, target_txid: int | None = None, work_dir: Path | None = None
) -> VerifyReport:
    """Prove the chain to `target_txid`, then restore it for real to a temporary file (the
    restored file's checksum must equal the source's, and `PRAGMA integrity_check` must pass)
    and remove it.  Raises like `verify_replica`, and `RestoreError` for a failed restore.
    """
    report = await verify_replica(client, target_txid=target_txid, spill_dir=work_dir)
    with tempfile.TemporaryDirectory(prefix="replicad-drill-", dir=work_dir) as tmp:
        restored = await restore(
            client, Path(tmp) / "drill.db", target_txid=report.target_txid, integrity="full"
        )
    problems = list(report.problems)
    if restored.checksum is not None and restored.checksum != report.checksum:
        problems.append(
            f"the restored file's checksum {restored.checksum:016x} differs from the verified "
            f"chain's {report.checksum:016x} at TXID {report.target_txid}"
        )
    return dataclasses.replace(
        report, seconds=report.seconds + restored.seconds, restored=True, problems=problems
    )


@dataclass(frozen=True, slots=True)
class SampleResult:
    """One sampled TXID: the report, or why it did not verify."""

    txid: int
    report: VerifyReport | None
    error: str | None


async def sample_txids(
    client: ReplicaClient, count: int, *, rng: random.Random | None = None
) -> list[int]:
    """Up to `count` distinct TXIDs drawn at random from the replica's level-0 history (every
    transaction a restore can stop at, within the retention window), sorted.
    """
    rng = rng or random.Random()
    names = [n for info in await client.list_objects() if (n := parse_key(info.key))]
    ranges = sorted(
        (n.first_txid, n.last_txid) for n in names if n.kind is ObjectKind.SNAPSHOT or n.level == 0
    )
    total = sum(last - first + 1 for first, last in ranges)
    return sorted({_nth_txid(ranges, i) for i in rng.sample(range(total), min(count, total))})


def _nth_txid(ranges: list[tuple[int, int]], index: int) -> int:
    """The `index`-th TXID (from 0) of the inclusive `ranges`, counted in order."""
    for first, last in ranges:
        if index <= last - first:
            return first + index
        index -= last - first + 1
    raise IndexError(index)


async def verify_sample(
    client: ReplicaClient,
    count: int,
    *,
    rng: random.Random | None = None,
    spill_dir: Path | None = None,
) -> list[SampleResult]:
    """Verify the chain to each of `count` random TXIDs (`sample_txids`)."""
    results = []
    for txid in await sample_txids(client, count, rng=rng):
        try:
            report = await verify_replica(client, target_txid=txid, spill_dir=spill_dir)
        except (FormatError, RestoreError) as exc:
            results.append(SampleResult(txid, None, str(exc)))
        else:
            results.append(SampleResult(txid, report, None))
    return results
