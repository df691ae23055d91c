"""`replicad find`: the transactions that changed a query's answer ("which write deleted my rows?").

The database is rebuilt once as of the start of the range and moved forward one transaction at
a time (replay.py); after each one the operator's query runs on the scratch copy, and every
transaction after which the answer differs from the answer before it is reported, with what it
was, what it became, and the TXID to restore for the state just before it.

The query is confined to reading: each run opens its own connection read-only (`immutable`, so
SQLite neither locks the scratch file nor looks for a WAL beside it) and an authorizer refuses
everything but SELECT, reading tables and calling functions, so neither ATTACH nor a writing
PRAGMA gets through.  A query that fails on some state (a table not created yet, or dropped)
gives that error as its answer: a DROP TABLE shows up as a change like any other.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.request import pathname2url

from replicad.clients.base import ReplicaClient
from replicad.errors import ConfigError
from replicad.replay import TxidRange, scratch_replay

#: What a query may do: anything else is refused when it is prepared.
_ALLOWED: Final = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)

#: A query's answer on one state: its rows, or the error it raised there.
Answer = tuple[tuple[object, ...], ...] | str


@dataclass(frozen=True, slots=True)
class Change:
    """A transaction after which the query's answer differs from the answer before it."""

    txid: int
    commit_time_ns: int
    before: Answer
    after: Answer

    @property
    def restore_txid(self) -> int:
        """The TXID to restore for the state just before this transaction."""
        return self.txid - 1


@dataclass(slots=True)
class FindStats:
    """What a search cost."""

    examined: int = 0
    seconds: float = 0.0
    base_bytes: int = 0
    step_bytes: int = 0
    base_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)


class Query:
    """A read-only SQL statement, run on a database file with a fresh connection each time.

    A fresh connection per run because the file changes under it between runs: SQLite would
    otherwise trust pages it cached before (nothing it checks changes when pages are written
    in place).
    """

    def __init__(self, sql: str) -> None:
        self.sql = sql

    def check(self, path: Path) -> Answer:
        """Run once on the first state; `ConfigError` if the statement cannot be a read-only
        query at all (a syntax error, or something other than reading).
        """
        answer = self.run(path)
        if isinstance(answer, str) and ("syntax error" in answer or "not authorized" in answer):
            raise ConfigError(
                f"cannot run --sql {self.sql!r}: {answer.removeprefix('error: ')}",
                hint="give one read-only statement (SELECT ...); writes, ATTACH and PRAGMA are "
                "refused",
            )
        return answer

    def run(self, path: Path) -> Answer:
        """The rows the query returns on the database at `path`, or "error: ..." if it fails."""
        conn = sqlite3.connect(f"file:{pathname2url(str(path))}?mode=ro&immutable=1", uri=True)
        try:
            conn.set_authorizer(_authorize)
            return tuple(tuple(row) for row in conn.execute(self.sql).fetchall())
        except (sqlite3.DatabaseError, sqlite3.Warning) as exc:
            return f"error: {exc}"
        finally:
            conn.close()


def _authorize(action: int, *_: object) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


async def find_changes(
    client: ReplicaClient,
    query: Query,
    txids: TxidRange,
    *,
    scratch_parent: Path | None = None,
    stats: FindStats | None = None,
    on_base: Callable[[Answer], None] | None = None,
) -> AsyncGenerator[Change, None]:
    """Every transaction in `txids` after which `query`'s answer changed, in order.

    The scratch copy lives in a private temporary directory under `scratch_parent` (default:
    the system's) and is removed at the end.  `stats` is filled in as the search goes;
    `on_base` is given the answer on the state before the range.
    """
    stats = stats if stats is not None else FindStats()
    async with scratch_replay(client, txids.base_txid, parent=scratch_parent) as replay:
        stats.base_bytes = replay.base_bytes
        stats.base_seconds = time.monotonic() - stats.started
        answer = query.check(replay.path)
        if on_base is not None:
            on_base(answer)
        async with contextlib.aclosing(replay.steps(txids.last_txid)) as steps:
            async for step in steps:
                stats.examined += 1
                after = query.run(replay.path)
                if after != answer:
                    yield Change(step.info.txid, step.info.commit_time_ns, answer, after)
                answer = after
                stats.step_bytes = replay.step_bytes
                stats.seconds = time.monotonic() - stats.started
        stats.step_bytes = replay.step_bytes


def answer_json(answer: Answer) -> object:
    """An answer as JSON-ready data: one value for a 1x1 result, else a list of rows; an error
    as {"error": message}; blobs as hex strings.
    """
    if isinstance(answer, str):
        return {"error": answer.removeprefix("error: ")}
    rows = [[_value(v) for v in row] for row in answer]
    if len(rows) == 1 and len(rows[0]) == 1:
        return rows[0][0]
    return rows


def _value(value: object) -> object:
    return value.hex() if isinstance(value, bytes) else value


def answer_text(answer: Answer) -> str:
    """An answer as one line of text."""
    if isinstance(answer, str):
        return answer
    data = answer_json(answer)
    return repr(data) if isinstance(data, str) else str(data)
