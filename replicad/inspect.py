"""What a replica holds, for operators: summaries (`replicad ls`) and transaction logs
(`replicad log`).

A summary is one listing.  The brief log reads the trailers of the level-0 segments in the time
range (with range requests where the backend has them: the footer and trailer, not the pages).
The full log replays the range onto a scratch copy (replay.py) and says what each transaction
did to tables, indexes, schema, freelist and size (describe.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from replicad.clients.base import ReplicaClient
from replicad.describe import Describer, Description
from replicad.errors import FormatError, RestoreError
from replicad.format import TxnInfo
from replicad.position import ObjectKind, ObjectName
from replicad.replay import TxidRange, scratch_replay
from replicad.restore import RestorePlan, empty_replica_error, names_from_listing
from replicad.restore.listing import read_trailer_of


@dataclass(frozen=True, slots=True)
class LevelSummary:
    """Objects of one kind and level."""

    kind: str
    level: int
    objects: int
    bytes: int
    first_txid: int
    last_txid: int
    oldest: str
    newest: str


@dataclass(frozen=True, slots=True)
class ReplicaSummary:
    """What `replicad ls` prints for one replica."""

    url: str
    objects: int
    bytes: int
    newest_txid: int
    newest_commit: str | None
    age_seconds: float | None
    snapshots: list[dict[str, object]]
    levels: list[LevelSummary]

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One transaction in `replicad log`; what it did is None in the brief log."""

    txid: int
    committed: str
    pages: int
    db_pages: int
    #: Pages written per table or index ("(freelist)", "(header)", "(other)" for the rest).
    touched: dict[str, int] | None = None
    #: Schema objects created, dropped, altered ("table orders"), when the schema changed.
    schema: dict[str, list[str]] | None = None
    freed_pages: int | None = None
    size_change: int | None = None
    marks: list[str] | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form, without the fields the brief log leaves out."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(slots=True)
class LogStats:
    """What a log cost: transactions listed, bytes read for the state before the range (full
    log only) and for the transactions themselves.
    """

    transactions: int = 0
    base_bytes: int = 0
    bytes: int = 0
    scans: int = 0
    sizes: dict[str, int] = field(default_factory=dict)


async def summarize(client: ReplicaClient) -> ReplicaSummary:
    """One LIST, summarized: snapshots, segment levels, newest TXID and its age.

    Raises `RestoreError` for a replica that holds nothing (a wrong URL, most likely).
    """
    names = names_from_listing(await client.list_objects())
    if not names:
        raise empty_replica_error()
    newest = max(names, key=lambda n: n.last_txid, default=None)
    newest_ms = newest.max_time_ms if newest else None
    return ReplicaSummary(
        url=client.url,
        objects=len(names),
        bytes=sum(names.values()),
        newest_txid=newest.last_txid if newest else 0,
        newest_commit=iso(newest_ms) if newest_ms is not None else None,
        age_seconds=round(time.time() - newest_ms / 1000, 3) if newest_ms is not None else None,
        snapshots=[
            {"txid": n.last_txid, "taken": iso(n.max_time_ms), "bytes": size}
            for n, size in sorted(names.items())
            if n.kind is ObjectKind.SNAPSHOT
        ],
        levels=_levels(names),
    )


def _levels(names: dict[ObjectName, int]) -> list[LevelSummary]:
    groups: dict[tuple[str, int], list[ObjectName]] = {}
    for name in names:
        groups.setdefault((name.kind.value, name.level), []).append(name)
    return [
        LevelSummary(
            kind=kind,
            level=level,
            objects=len(group),
            bytes=sum(names[n] for n in group),
            first_txid=min(n.first_txid for n in group),
            last_txid=max(n.last_txid for n in group),
            oldest=iso(min(n.min_time_ms for n in group)),
            newest=iso(max(n.max_time_ms for n in group)),
        )
        for (kind, level), group in sorted(groups.items())
    ]


async def transaction_log(
    client: ReplicaClient,
    *,
    since_ns: int | None = None,
    until_ns: int | None = None,
    stats: LogStats | None = None,
) -> list[LogEntry]:
    """Every transaction committed in [since, until] per the level-0 segments' trailers.

    Raises `RestoreError` when the range is reversed or holds no transaction.
    """
    stats = stats if stats is not None else LogStats()
    if since_ns is not None and until_ns is not None and since_ns > until_ns:
        raise RestoreError("--since is after --until: the range is empty")
    names = names_from_listing(await client.list_objects())
    since_ms = -1 if since_ns is None else since_ns // 1_000_000
    until_ms = 10**14 if until_ns is None else until_ns // 1_000_000
    before = client.stats.bytes_downloaded
    entries: list[LogEntry] = []
    for name in _segments_between(names, since_ms, until_ms):
        for info in await read_trailer_of(client, name, names[name]):
            if (since_ns is None or info.commit_time_ns >= since_ns) and (
                until_ns is None or info.commit_time_ns <= until_ns
            ):
                entries.append(
                    LogEntry(info.txid, iso_ns(info.commit_time_ns), info.page_count, info.db_pages)
                )
    stats.bytes += client.stats.bytes_downloaded - before
    stats.transactions = len(entries)
    if not entries:
        raise RestoreError(
            "no transaction was committed in that range",
            hint="`replicad ls URL` shows the oldest and newest commit times the replica holds",
        )
    return entries


async def commit_time_ns(client: ReplicaClient, plan: RestorePlan) -> int:
    """When the plan's target transaction was committed (as replicad saw it)."""
    name, size = plan.objects[-1], plan.sizes[-1]
    for info in await read_trailer_of(client, name, size):
        if info.txid == plan.target_txid:
            return info.commit_time_ns
    raise FormatError(f"object {name.key} does not list TXID {plan.target_txid}")


async def detailed_log(
    client: ReplicaClient,
    txids: TxidRange,
    *,
    scratch_parent: Path | None = None,
    stats: LogStats | None = None,
) -> AsyncGenerator[LogEntry, None]:
    """Each transaction in `txids` and what it did, replayed onto a scratch copy."""
    stats = stats if stats is not None else LogStats()
    async with scratch_replay(client, txids.base_txid, parent=scratch_parent) as replay:
        stats.base_bytes = replay.base_bytes
        describer = Describer(replay.path, replay.page_size)
        try:
            async with contextlib.aclosing(replay.steps(txids.last_txid)) as steps:
                async for step in steps:
                    stats.transactions += 1
                    stats.bytes = replay.step_bytes
                    yield _entry(step.info, describer.describe(step))
        finally:
            describer.close()
            stats.bytes = replay.step_bytes
            stats.scans = describer.scans


def _entry(info: TxnInfo, what: Description) -> LogEntry:
    return LogEntry(
        info.txid,
        iso_ns(info.commit_time_ns),
        info.page_count,
        info.db_pages,
        touched=what.touched,
        schema=None if what.schema is None else asdict(what.schema),
        freed_pages=what.freed_pages,
        size_change=what.size_change,
        marks=what.marks(),
    )


def _segments_between(
    names: Iterable[ObjectName], since_ms: int, until_ms: int
) -> list[ObjectName]:
    return sorted(
        (
            n
            for n in names
            if n.kind is ObjectKind.SEGMENT
            and n.level == 0
            and n.max_time_ms >= since_ms
            and n.min_time_ms <= until_ms
        ),
        key=lambda n: n.first_txid,
    )


def iso(ms: int) -> str:
    """Unix milliseconds as RFC 3339 UTC."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def iso_ns(ns: int) -> str:
    """Unix nanoseconds as RFC 3339 UTC, to the nanosecond.

    Exact, so a time copied from `replicad log` or `find` into `--timestamp`, `--since` or
    `--until` names that very transaction (a rounded time could fall just after it or before).
    """
    seconds, fraction = divmod(ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{moment}.{fraction:09d}+00:00"
