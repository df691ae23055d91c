"""What a replica holds, for operators: summaries (`replicad ls`) and transaction logs
(`replicad log`).  Built from one listing plus, for the log, the trailers of the segments in the
requested time range."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from replicad.clients.base import ReplicaClient
from replicad.position import ObjectKind, ObjectName
from replicad.restore import names_from_listing
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
    """One transaction in `replicad log`."""

    txid: int
    committed: str
    pages: int
    db_pages: int


async def summarize(client: ReplicaClient) -> ReplicaSummary:
    """One LIST, summarized: snapshots, segment levels, newest TXID and its age."""
    names = names_from_listing(await client.list_objects())
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
    client: ReplicaClient, *, since_ns: int | None = None, until_ns: int | None = None
) -> list[LogEntry]:
    """Every transaction committed in [since, until] per the level-0 segments' trailers."""
    names = names_from_listing(await client.list_objects())
    since_ms = -1 if since_ns is None else since_ns // 1_000_000
    until_ms = 10**14 if until_ns is None else until_ns // 1_000_000
    entries: list[LogEntry] = []
    for name in _segments_between(names, since_ms, until_ms):
        for info in await read_trailer_of(client, name, names[name]):
            if (since_ns is None or info.commit_time_ns >= since_ns) and (
                until_ns is None or info.commit_time_ns <= until_ns
            ):
                entries.append(
                    LogEntry(info.txid, iso_ns(info.commit_time_ns), info.page_count, info.db_pages)
                )
    return entries


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
    """Unix nanoseconds as RFC 3339 UTC (microsecond precision)."""
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat(timespec="microseconds")
