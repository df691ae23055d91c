"""A deterministic SQLite writer for tests and benchmarks, runnable as a separate process.

Transaction k is a pure function of (seed, k), and every transaction records k in `meta.seq`,
so the state after any committed prefix can be rebuilt by `replay(seed, k)` and compared with a
restored database.  The writer logs each commit as "k time_ns" after COMMIT returns.

    python tests/workload.py DB --seed 1 --count 1000 --rate 200 --log LOG [--autocheckpoint N]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta(id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER)",
    "INSERT OR IGNORE INTO meta VALUES (1, 0)",
    "CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, k INTEGER, v TEXT, b BLOB)",
    "CREATE INDEX IF NOT EXISTS items_k ON items(k)",
]

VACUUM_EVERY = 211
SCHEMA_EVERY = 97
PURGE_EVERY = 150


def setup(conn: sqlite3.Connection) -> None:
    """Create the schema (idempotent) and put the database in WAL mode."""
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in SCHEMA:
        conn.execute(statement)
    conn.commit()


def apply_txn(conn: sqlite3.Connection, seed: int, k: int, *, vacuum: bool = True) -> None:
    """Run transaction k (and, every VACUUM_EVERY, a VACUUM after it). Commits."""
    rng = random.Random(f"{seed}:{k}")
    conn.execute("BEGIN")
    for _ in range(rng.randint(1, 4)):
        _random_op(conn, rng, k)
    if k % SCHEMA_EVERY == 0:
        conn.execute(f"CREATE TABLE extra_{k}(x INTEGER, y TEXT)")
        conn.execute(f"INSERT INTO extra_{k} VALUES (?, ?)", (k, "s" * rng.randint(1, 3000)))
    if k % PURGE_EVERY == 0:
        conn.execute("DELETE FROM items WHERE id % 3 = ?", (k % 3,))
    conn.execute("UPDATE meta SET seq = ?", (k,))
    conn.execute("COMMIT")
    if vacuum and k % VACUUM_EVERY == 0:
        conn.execute("VACUUM")  # a commit of its own that changes no row: state still "k"


def _random_op(conn: sqlite3.Connection, rng: random.Random, k: int) -> None:
    roll = rng.random()
    if roll < 0.55:
        blob = rng.randbytes(rng.choice((0, 16, 700, 5000, 9000)))
        conn.execute(
            "INSERT INTO items(k, v, b) VALUES (?, ?, ?)",
            (k, "v" * rng.randint(1, 300), blob),
        )
    elif roll < 0.85:
        conn.execute(
            "UPDATE items SET v = ?, b = ? WHERE id = ?",
            ("u" * rng.randint(1, 500), rng.randbytes(rng.randint(0, 2000)), rng.randint(1, 3 * k)),
        )
    else:
        conn.execute("DELETE FROM items WHERE id = ?", (rng.randint(1, 3 * k),))


def dump(path: Path) -> dict[str, Any]:
    """Logical content: schema and every table's rows in rowid order."""
    conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True)
    try:
        schema = sorted(
            conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        )
        tables = [name for kind, name, _ in schema if kind == "table"]
        rows = {t: conn.execute(f'SELECT * FROM "{t}" ORDER BY rowid').fetchall() for t in tables}
        return {"schema": schema, "rows": rows}
    finally:
        conn.close()


def digest(path: Path) -> str:
    """SHA-256 of the logical content `dump` reads, computed row by row (bounded memory)."""
    conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True)
    try:
        return digest_of(conn)
    finally:
        conn.close()


def digest_of(conn: sqlite3.Connection) -> str:
    """`digest` of what an open connection sees (inside its current read transaction)."""
    sha = hashlib.sha256()
    schema = sorted(
        conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
    )
    sha.update(repr(schema).encode())
    for kind, name, _ in schema:
        if kind == "table":
            sha.update(repr(name).encode())
            for row in conn.execute(f'SELECT * FROM "{name}" ORDER BY rowid'):
                sha.update(repr(row).encode())
    return sha.hexdigest()


def seq_of(path: Path) -> int:
    """The last transaction number recorded in a database."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT seq FROM meta").fetchone()[0])
    finally:
        conn.close()


def integrity(path: Path) -> str:
    """PRAGMA integrity_check of a database, joined."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def replay(seed: int, k: int, path: Path) -> dict[str, Any]:
    """The logical content after transactions 1..k, rebuilt in a fresh database at `path`."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        setup(conn)
        for i in range(1, k + 1):
            apply_txn(conn, seed, i, vacuum=False)
    finally:
        conn.close()
    return dump(path)


def replays(
    seed: int, ks: set[int], path: Path, view: Callable[[Path], Any] = dump
) -> dict[int, Any]:
    """`view` (`dump`, or `digest` for large states) of the state after transactions 1..k, for
    every k in `ks`, built in one pass over 1..max(ks) in a fresh database at `path`.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    out: dict[int, Any] = {}
    try:
        setup(conn)
        if 0 in ks:
            out[0] = view(path)
        for k in range(1, max(ks, default=0) + 1):
            apply_txn(conn, seed, k, vacuum=False)
            if k in ks:
                out[k] = view(path)
    finally:
        conn.close()
    return out


def read_log(path: Path) -> list[tuple[int, int]]:
    """(k, commit time ns) for every commit the writer logged."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out.append((int(parts[0]), int(parts[1])))
    return out


def run(args: argparse.Namespace) -> None:
    """The writer process: `count` transactions at `rate` per second, logging each commit."""
    conn = sqlite3.connect(args.db, isolation_level=None, timeout=30)
    conn.execute("PRAGMA synchronous=NORMAL")
    if args.autocheckpoint is not None:
        conn.execute(f"PRAGMA wal_autocheckpoint={args.autocheckpoint}")
    setup(conn)
    start_k = int(conn.execute("SELECT seq FROM meta").fetchone()[0]) + 1
    with open(args.log, "a", buffering=1) as log:
        for k in paced(range(start_k, start_k + args.count), args.rate):
            apply_txn(conn, args.seed, k)
            log.write(f"{k} {time.time_ns()}\n")
    conn.close()


def paced(steps: Iterable[int], rate: float) -> Iterator[int]:
    """`steps`, one every 1/`rate` seconds on an absolute schedule (`rate` 0: no pause).

    Every writer of the tests and benchmarks paces its transactions with this: a slow commit is
    caught up on by the next ones instead of shifting all that follow, so the offered rate holds.
    """
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.monotonic()
    for step in steps:
        yield step
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry of the writer process."""
    p = argparse.ArgumentParser()
    p.add_argument("db")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--log", required=True)
    p.add_argument("--autocheckpoint", type=int)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
