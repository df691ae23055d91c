"""A bad write, replicated by a real daemon: the history that `find`, `log` and the runbook are
tried on.

The application keeps customers and invoices.  While the daemon runs it inserts a few invoices
(good), then deletes every invoice (the bad write), then keeps inserting customers (good writes
after the bad one, which a repair must keep), then creates and drops a scratch table, and
vacuums.  The daemon is stopped cleanly, so the replica holds everything committed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.procs import replicad, start_daemon, stop, wait_for

CUSTOMERS = 300
INVOICES = 300
GOOD_INVOICES = 5
LATER_CUSTOMERS = 30


@dataclass(frozen=True)
class Incident:
    """Where the incident's files are (`replica` is the local directory of a file replica)."""

    db: Path
    replica: Path
    daemon_log: Path
    url: str


def _connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db, isolation_level=None, timeout=10)


def make_incident(
    directory: Path, *, url: str | None = None, env: Mapping[str, str] | None = None
) -> Incident:
    """Build the history in `directory` (app.db, daemon.log), replicated to `url` (default: a
    file replica in directory/replica) by a daemon given `env`.
    """
    replica = directory / "replica"
    incident = Incident(
        directory / "app.db", replica, directory / "daemon.log", url or replica.as_uri()
    )
    conn = _connect(incident.db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
    conn.execute(
        "CREATE TABLE invoices (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, "
        "amount INTEGER NOT NULL, note TEXT)"
    )
    conn.execute("CREATE INDEX invoices_customer ON invoices (customer_id)")
    with conn:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO customers (id, name) VALUES (?, ?)",
            [(i, f"customer {i}") for i in range(1, CUSTOMERS + 1)],
        )
        conn.executemany(
            "INSERT INTO invoices (id, customer_id, amount, note) VALUES (?, ?, ?, ?)",
            [(i, i, 100 * i, "x" * 200) for i in range(1, INVOICES + 1)],
        )
    conn.close()
    daemon = start_daemon([str(incident.db), incident.url], incident.daemon_log, env=env)
    try:
        wait_for(
            lambda: "snapshot uploaded" in incident.daemon_log.read_text(), 30, "the first snapshot"
        )
        conn = _connect(incident.db)
        for i in range(INVOICES + 1, INVOICES + GOOD_INVOICES + 1):
            conn.execute("INSERT INTO invoices VALUES (?, ?, ?, 'good')", (i, 1, i))
        conn.execute("DELETE FROM invoices")  # the bad write
        for i in range(CUSTOMERS + 1, CUSTOMERS + LATER_CUSTOMERS + 1):
            conn.execute("INSERT INTO customers (id, name) VALUES (?, ?)", (i, f"customer {i}"))
        conn.execute("CREATE TABLE scratch (x)")
        conn.execute("INSERT INTO scratch VALUES (1)")
        conn.execute("DROP TABLE scratch")
        conn.execute("VACUUM")  # gives the freed pages back: the database shrinks
        conn.close()
    finally:
        status = stop(daemon)
    assert status == 0, incident.daemon_log.read_text()[-3000:]
    return incident


def count(db: Path, table: str) -> int:
    """Rows in `table` of the database at `db` (its -wal included, as an application sees it)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (n,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(n)
    finally:
        conn.close()


def restore_txid(incident: Incident, txid: int, out: Path) -> None:
    """`replicad restore --txid TXID -o OUT URL`, which must succeed."""
    result = replicad("restore", "--txid", str(txid), "-o", str(out), incident.url)
    assert result.returncode == 0, result.stderr
