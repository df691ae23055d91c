"""Checkpoints driven by replicad: what to run when, on a connection of their own.

Why replicad checkpoints at all, even when the application's autocheckpoint is on: the
application checkpoints inside its COMMIT, before replicad has captured that commit, so its
checkpoint can only copy frames up to replicad's read mark and the WAL is never fully copied
back; SQLite restarts the WAL only then, so without help the WAL grows for ever (measured: 20 MB
after 3,000 commits, against 4 MB without replicad).  replicad checkpoints right after a sync,
when its read mark is at the end of the WAL, and then moves its read mark once more so that the
next holder starts on a fully copied WAL (read mark 0) and the application's next write can
restart it.

Modes (``PRAGMA wal_checkpoint``):

* PASSIVE at `checkpoint_pages` frames in the current WAL generation, or after
  `checkpoint_interval` seconds with new frames.  A first PASSIVE copies the bulk without any
  lock.  Then, because commits arrive every few milliseconds under load and a new read mark
  taken after one of them would again block the restart, replicad holds the writers off for a
  moment (``BEGIN IMMEDIATE`` on a second connection, bounded by `checkpoint_timeout`):
  it captures the last frames, copies them, starts its next read on the fully copied WAL
  (read mark 0), and lets go.  Measured: milliseconds; without it the WAL grew to 34 MB at
  400 commits/s.
* TRUNCATE at `truncate_pages`: waits for readers (replicad's own included: the caller keeps
  leapfrogging while it runs) and holds the application's writers off while it does, for at most
  `checkpoint_timeout` seconds.  It guarantees the WAL is emptied.

A checkpoint never erases a frame replicad has not captured: SQLite copies frames only up to the
oldest reader's snapshot and restarts the WAL only when no reader uses it, and replicad always
holds a read mark until what it covers has been captured (see db.py).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from replicad.errors import DatabaseError

#: Frames in the current WAL generation that trigger a PASSIVE checkpoint (SQLite's own default).
DEFAULT_CHECKPOINT_PAGES = 1000
#: Seconds after which a WAL with new frames is checkpointed even below the page threshold.
DEFAULT_CHECKPOINT_INTERVAL = 60.0
#: Frames at which replicad forces the WAL empty with TRUNCATE.
DEFAULT_TRUNCATE_PAGES = 10000
#: Longest a TRUNCATE may wait for readers, holding the application's writers off meanwhile.
DEFAULT_CHECKPOINT_TIMEOUT = 1.0

MODES = ("PASSIVE", "FULL", "RESTART", "TRUNCATE")
#: How long replicad waits for SQLite's write lock to finish a checkpoint: short, because while
#: it waits its read mark cannot move (see `Checkpointer.hold_writers`).
HOLD_WAIT_MS = 20


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    """What one checkpoint did."""

    mode: str
    #: True when SQLite gave up waiting (another connection held it off).
    busy: bool
    #: Frames in the WAL, and frames copied back into the database, as SQLite reports them.
    log_frames: int
    checkpointed_frames: int
    seconds: float


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """When replicad checkpoints. `checkpoint_pages = 0` turns replicad's checkpoints off."""

    checkpoint_pages: int = DEFAULT_CHECKPOINT_PAGES
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL
    truncate_pages: int = DEFAULT_TRUNCATE_PAGES
    checkpoint_timeout: float = DEFAULT_CHECKPOINT_TIMEOUT

    def mode_for(
        self, frames: int, seconds_since_last: float, *, may_wait: bool = True
    ) -> str | None:
        """The checkpoint to run for a WAL generation of `frames` frames, or None.

        `may_wait` False rules out TRUNCATE: after one was held off by a long reader, trying
        again at once would stall the application's writers again for nothing.
        """
        if self.checkpoint_pages <= 0 or frames <= 0:
            return None
        if may_wait and self.truncate_pages and frames >= self.truncate_pages:
            return "TRUNCATE"
        if frames >= self.checkpoint_pages or seconds_since_last >= self.checkpoint_interval:
            return "PASSIVE"
        return None


class Checkpointer:
    """Runs checkpoints on its own read-write connection (blocking; one at a time).

    The connection is separate from the read holders so a checkpoint can wait in a worker
    thread while the holders keep moving.  It is closed before the holders, so it is never the
    last connection and never triggers SQLite's checkpoint-and-delete on close.
    """

    def __init__(self, path: Path, *, timeout: float = DEFAULT_CHECKPOINT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._conn: sqlite3.Connection | None = None
        self._gate: sqlite3.Connection | None = None

    def run(self, mode: str) -> CheckpointResult:
        """Run ``PRAGMA wal_checkpoint(mode)``. Raises `DatabaseError` if it cannot run at all."""
        if mode not in MODES:
            raise ValueError(f"unknown checkpoint mode {mode!r}")
        conn = self._connection()
        started = time.monotonic()
        try:
            busy, log, done = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except sqlite3.Error as exc:
            raise DatabaseError(f"{mode} checkpoint of {self.path} failed: {exc}") from exc
        return CheckpointResult(mode, bool(busy), log, done, time.monotonic() - started)

    def hold_writers(self) -> bool:
        """Take SQLite's write lock, waiting at most `HOLD_WAIT_MS`, so the WAL stops growing.

        Returns False if someone kept it longer: the application in a long transaction, or
        another process's TRUNCATE, which holds it while it waits for replicad's read mark to
        move, something replicad could not do while it waited here.  The caller tries again at
        the next sync.  Nothing is written either way; `release_writers` must follow a True.
        """
        if self._gate is None:
            self._gate = self._open(busy_ms=HOLD_WAIT_MS)
        try:
            self._gate.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False
        return True

    def release_writers(self) -> None:
        """Let the application's writers go again."""
        assert self._gate is not None
        self._gate.execute("ROLLBACK")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._open(busy_ms=int(self.timeout * 1000))
        return self._conn

    def _open(self, *, busy_ms: int) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=0
            )
            conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        except sqlite3.Error as exc:
            raise DatabaseError(
                f"cannot open {self.path} for checkpoints: {exc}",
                hint="replicad needs write access to the database file and its directory "
                "to checkpoint; or set checkpoint_pages = 0 and let the application do it",
            ) from exc
        return conn

    def close(self) -> None:
        """Close the connections (before the read holders; see the class docstring)."""
        for conn in (self._gate, self._conn):
            if conn is not None:
                conn.close()
        self._gate = self._conn = None
