"""replicad next to the application's other SQLite users: checkpointers, long readers, restarts.

Every test runs real processes on local files: the deterministic writer (tests/workload.py),
external checkpointers and long readers (small scripts below, started with subprocess), and the
daemon.  The claims come from DESIGN.md sections 3-4: the daemon's read mark moves after every
sync, so other processes' checkpoints are not starved and the app's writers are not stalled;
continuity is kept (exactly one snapshot) unless the WAL was restarted while the daemon was not
running; and a restore at any TXID is the writer's state after some commit k.

How an external checkpoint's result reads (``PRAGMA wal_checkpoint`` returns busy, log, copied):

* busy with log = copied = -1, returned at once: another connection held the checkpoint lock
  (was checkpointing).  SQLite never waits for that lock, whatever the busy timeout.
* busy with log >= 0: it waited for readers (or the write lock) for its whole busy timeout.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from replicad.position import ObjectKind, parse_key
from tests import workload
from tests.procs import (
    CHECKPOINTER,
    LONG_READER,
    ROOT,
    clean_env,
    replicad,
    start_daemon,
    start_writer,
    stop,
    wait_for,
)

RATE = 300.0
#: An external checkpoint taking longer than this was starved.  The daemon leapfrogs on every
#: sync and on file events; its poll tick (1 s) bounds the wait even when an event is missed.
CHECKPOINT_BOUND = 1.5
#: The writer's worst commit latency with a long reader and an external TRUNCATE running.
COMMIT_BOUND = 2.5
CONTINUITY_LOST = "continuity lost; taking a new snapshot"
NOT_RUNNING = "while replicad was not running"
#: How long the randomized soak runs (`pytest -m slow`); INTERPLAY_SEED=N replays one run.
SOAK_SECONDS = float(os.environ.get("INTERPLAY_SOAK_SECONDS", "150"))


@dataclass
class Run:
    """The files of one scenario and the processes started for it (killed at teardown)."""

    tmp: Path
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def db(self) -> Path:
        return self.tmp / "app.db"

    @property
    def replica(self) -> Path:
        return self.tmp / "replica"

    @property
    def wlog(self) -> Path:
        return self.tmp / "writer.log"

    @property
    def dlog(self) -> Path:
        return self.tmp / "daemon.log"

    def make_db(self, **db_keys: float) -> None:
        """The application's database (schema, WAL mode) and a daemon config for it.

        Debug logging makes the daemon log each of its own checkpoints (for diagnosis).
        """
        conn = sqlite3.connect(self.db)
        workload.setup(conn)
        conn.close()
        keys = "".join(f"{k} = {v}\n" for k, v in db_keys.items())
        (self.tmp / "replicad.toml").write_text(
            f"log_level = 'debug'\n[[databases]]\npath = '{self.db}'\n{keys}"
            f"[[databases.replicas]]\nurl = '{self.replica.as_uri()}'\n"
        )

    def daemon(self) -> subprocess.Popen[bytes]:
        proc = start_daemon(["-c", str(self.tmp / "replicad.toml")], self.dlog)
        self.procs.append(proc)
        return proc

    def daemon_with_snapshot(self) -> subprocess.Popen[bytes]:
        """Start the daemon and wait until its first snapshot is in the replica."""
        proc = self.daemon()
        wait_for(lambda: bool(snapshots(self.replica)) or proc.poll() is not None, 30, "snapshot")
        assert proc.poll() is None, self.log_tail()
        return proc

    def daemon_restarted(self) -> subprocess.Popen[bytes]:
        """Start the daemon again and wait until it has resumed or taken its snapshot."""
        before = self._starts()
        proc = self.daemon()
        wait_for(lambda: self._starts() > before or proc.poll() is not None, 30, "start-up")
        assert proc.poll() is None, self.log_tail()
        return proc

    def _starts(self) -> int:
        done = ("resumed from replica", "snapshot taken")
        return sum(e.get("event") in done for e in self.events())

    def stop_daemon(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM: the daemon must ship everything committed and exit 0."""
        assert stop(proc) == 0, self.log_tail()

    def writer(
        self, *, seed: int, count: int, autocheckpoint: int | None
    ) -> subprocess.Popen[bytes]:
        proc = start_writer(
            self.db, self.wlog, seed=seed, count=count, rate=RATE, autocheckpoint=autocheckpoint
        )
        self.procs.append(proc)
        return proc

    def checkpointer(
        self, mode: str, *, interval: float = 0.3, busy_ms: int = 5000, log: str = "checkpoints"
    ) -> subprocess.Popen[bytes]:
        """Another process running PRAGMA wal_checkpoint(MODE) (the application, a cron job)."""
        args = [self.db, mode, interval, busy_ms, self.tmp / f"{log}.jsonl"]
        proc = subprocess.Popen(
            [sys.executable, "-c", CHECKPOINTER, *map(str, args)], env=clean_env(), cwd=ROOT
        )
        self.procs.append(proc)
        return proc

    def checkpoints(self, log: str = "checkpoints") -> list[dict[str, Any]]:
        path = self.tmp / f"{log}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def long_reader(self, seconds: float) -> tuple[subprocess.Popen[str], int]:
        """A process holding one read transaction for `seconds`; returns it and its start."""
        proc = subprocess.Popen(
            [sys.executable, "-c", LONG_READER, str(self.db), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
            env=clean_env(),
            cwd=ROOT,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "reading"
        return proc, time.time_ns()

    def commits(self) -> int:
        return len(workload.read_log(self.wlog))

    def wait_commits(self, n: int) -> None:
        wait_for(lambda: self.commits() >= n, 30, f"{n} commits")

    def events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log records (other lines, such as a traceback, are skipped)."""
        if not self.dlog.exists():
            return []
        out = []
        for line in self.dlog.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def log_tail(self) -> str:
        return self.dlog.read_text()[-4000:] if self.dlog.exists() else "(no daemon log)"

    def restore(self, name: str, txid: int | None = None) -> Path:
        """`replicad restore` (latest, or at `txid`); the result passes integrity_check."""
        out = self.tmp / name
        args = ["restore", "-o", str(out), self.replica.as_uri()]
        if txid is not None:
            args += ["--txid", str(txid)]
        result = replicad(*args)
        assert result.returncode == 0, result.stderr
        assert workload.integrity(out) == "ok"
        return out

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    scenario = Run(tmp_path)
    yield scenario
    scenario.kill_all()


def snapshots(replica: Path) -> list[Path]:
    return sorted((replica / "snapshots").glob("*.snap"))


def snapshot_txids(replica: Path) -> list[int]:
    names = [parse_key(f"snapshots/{path.name}") for path in snapshots(replica)]
    return sorted(name.last_txid for name in names if name is not None)


def segment_ranges(replica: Path) -> list[tuple[int, int]]:
    """(first, last) TXID of every level-0 segment, in TXID order."""
    out = []
    for path in (replica / "segments" / "00").glob("*.seg"):
        name = parse_key(f"segments/00/{path.name}")
        assert name is not None
        assert name.kind is ObjectKind.SEGMENT
        out.append((name.first_txid, name.last_txid))
    return sorted(out)


def worst_commit_gap(wlog: Path) -> float:
    """Longest time between consecutive commits, in seconds: a commit stalled X shows as >= X."""
    times = [t for _, t in workload.read_log(wlog)]
    return max((b - a for a, b in pairwise(times)), default=0) / 1e9


def waited_busy(c: dict[str, Any]) -> bool:
    """It waited its whole busy timeout for readers or writers and gave up: starved."""
    return bool(c["busy"]) and c["frames"] >= 0


def too_slow(c: dict[str, Any]) -> bool:
    return bool(c["seconds"] > CHECKPOINT_BOUND)


def explain(run: Run, bad: list[dict[str, Any]]) -> str:
    """The offending external checkpoints with the daemon's own checkpoints around each."""
    own = [
        (_log_time(e), {k: e[k] for k in ("mode", "busy", "frames", "seconds") if k in e})
        for e in run.events()
        if e.get("event") == "checkpoint"
    ]
    lines = []
    for c in bad:
        start = c["start_ns"] / 1e9
        near = [
            (round(t - start, 3), e) for t, e in own if start - 2 <= t <= start + c["seconds"] + 2
        ]
        lines.append(f"external {c}; daemon's own checkpoints (s after its start, ...): {near}")
    return "\n".join(lines)


def _log_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def pick_txids(replica: Path, rng: random.Random, n_random: int) -> list[int]:
    """Every snapshot, both ends of a middle segment, the last TXID and some random ones."""
    ranges = segment_ranges(replica)
    picks = set(snapshot_txids(replica))
    if ranges:
        first, last = ranges[0][0], ranges[-1][1]
        middle = ranges[len(ranges) // 2]
        picks |= {middle[0], middle[1], last}
        picks |= {rng.randint(first, last) for _ in range(n_random)}
    return sorted(picks)


def check_restores_match_replay(run: Run, seed: int, txids: list[int]) -> None:
    """Restore at each TXID; each is the writer's state after the k it records, k never falls."""
    restored = {txid: run.restore(f"at-{txid}.db", txid) for txid in txids}
    ks = {txid: workload.seq_of(path) for txid, path in restored.items()}
    in_txid_order = [ks[t] for t in txids]
    assert in_txid_order == sorted(in_txid_order), ks
    expected = workload.replays(seed, set(ks.values()), run.tmp / "replay.db")
    for txid, path in restored.items():
        assert workload.dump(path) == expected[ks[txid]], f"TXID {txid} (k = {ks[txid]})"


def assert_latest_restore_matches(run: Run) -> None:
    restored = run.restore("latest.db")
    assert workload.dump(restored) == workload.dump(run.db)


def continuity_losses(run: Run) -> list[dict[str, Any]]:
    return [e for e in run.events() if e.get("event") == CONTINUITY_LOST]


# -- 1. external checkpoints of every mode next to the daemon ---------------------------------


@pytest.mark.parametrize(
    ("mode", "app_autocheckpoint"),
    [("PASSIVE", 0), ("FULL", None), ("RESTART", 0), ("TRUNCATE", None)],
    ids=["PASSIVE-app-off", "FULL-app-autocheckpoint", "RESTART-app-off", "TRUNCATE-app-auto"],
)
def test_external_checkpoints_are_not_starved(
    run: Run, mode: str, app_autocheckpoint: int | None
) -> None:
    """Another process checkpoints every 0.3 s while the app writes 300 txn/s.

    Starvation (a checkpoint that waited for readers and gave up, or took too long) always
    fails.  A checkpoint that meets another one holding SQLite's checkpoint lock is answered
    busy at once (SQLite takes that lock without a busy handler): with the app's autocheckpoint
    on that happens without replicad too; with it off, replicad's own checkpoints are the other
    checkpointer, holding the lock a few ms per WAL's worth of frames.  Those collisions must
    stay rare (docs/design.md: set checkpoint_pages = 0 when another process checkpoints).
    """
    run.make_db()
    daemon = run.daemon_with_snapshot()
    writer = run.writer(seed=41, count=1200, autocheckpoint=app_autocheckpoint)
    checkpointer = run.checkpointer(mode)
    assert writer.wait(timeout=60) == 0
    assert stop(checkpointer, timeout=10) == 0
    run.stop_daemon(daemon)

    assert_latest_restore_matches(run)
    assert len(snapshots(run.replica)) == 1, run.log_tail()
    assert not continuity_losses(run)
    checkpoints = run.checkpoints()
    assert len(checkpoints) >= 5
    bad = [c for c in checkpoints if waited_busy(c) or too_slow(c)]
    assert not bad, explain(run, bad)
    collisions = [c for c in checkpoints if c["busy"]]  # a storm would make many
    assert len(collisions) <= max(2, len(checkpoints) // 4), explain(run, collisions)


# -- 2. a long reader, an external TRUNCATE and the daemon ------------------------------------


def test_long_reader_with_external_truncate(run: Run) -> None:
    """The app's reader pins the WAL for 3 s; TRUNCATE waits for it, the daemon must not add.

    SQLite's TRUNCATE holds the write lock while it waits for readers, for up to its busy
    timeout: the app's writer waits that long whatever replicad does (measured without replicad:
    a 5 s timeout and a 3 s reader stall the writer 2.9 s).  So this checkpointer gives up after
    1 s, and the writer's worst commit shows what replicad adds on top of that.
    """
    run.make_db()
    daemon = run.daemon_with_snapshot()
    writer = run.writer(seed=42, count=1500, autocheckpoint=None)
    checkpointer = run.checkpointer("TRUNCATE", busy_ms=1000)
    run.wait_commits(200)
    reader, reader_start = run.long_reader(3.0)
    assert reader.wait(timeout=30) == 0
    reader_end = time.time_ns()
    assert writer.wait(timeout=60) == 0
    wait_for(
        lambda: sum(c["start_ns"] > reader_end + 0.2e9 for c in run.checkpoints()) >= 3,
        10,
        "three TRUNCATEs after the reader ended",
    )
    assert stop(checkpointer, timeout=10) == 0
    run.stop_daemon(daemon)

    assert_latest_restore_matches(run)
    assert len(snapshots(run.replica)) == 1, run.log_tail()
    assert not continuity_losses(run)
    checkpoints = run.checkpoints()
    during = [c for c in checkpoints if reader_start <= c["start_ns"] < reader_end - 1e9]
    after = [c for c in checkpoints if c["start_ns"] > reader_end + 0.2e9]
    assert any(waited_busy(c) for c in during), "the reader should have held TRUNCATE off"
    assert any(not c["busy"] for c in after), explain(run, after)
    worst = worst_commit_gap(run.wlog)
    print(f"writer's worst commit gap: {worst:.3f} s")
    assert worst < COMMIT_BOUND, explain(run, [c for c in checkpoints if c["seconds"] > 0.5])


# -- 3. the daemon stopped and started while the application keeps writing -------------------


@pytest.mark.parametrize("truncate_while_down", [False, True], ids=["resume", "truncated"])
def test_daemon_restart(run: Run, truncate_while_down: bool) -> None:
    run.make_db(checkpoint_pages=0)  # nobody checkpoints but the explicit TRUNCATE below
    daemon = run.daemon_with_snapshot()
    writer = run.writer(seed=43, count=1200, autocheckpoint=0)
    run.wait_commits(300)
    run.stop_daemon(daemon)
    run.wait_commits(run.commits() + 150)
    if truncate_while_down:
        assert run.checkpointer("TRUNCATE", interval=0).wait(timeout=30) == 0
        [checkpoint] = run.checkpoints()
        assert not checkpoint["busy"], checkpoint
        run.wait_commits(run.commits() + 150)
    daemon = run.daemon_restarted()
    assert writer.wait(timeout=60) == 0
    run.stop_daemon(daemon)

    assert_latest_restore_matches(run)
    events = run.events()
    assert not continuity_losses(run)
    if truncate_while_down:
        assert len(snapshots(run.replica)) == 2, run.log_tail()
        reasons = [str(e["reason"]) for e in events if "reason" in e]
        assert any(NOT_RUNNING in r and ("restarted" in r or "truncated" in r) for r in reasons), (
            reasons
        )
    else:
        assert len(snapshots(run.replica)) == 1, run.log_tail()
        assert sum(e.get("event") == "resumed from replica" for e in events) == 1


# -- 4. restore at intermediate TXIDs is the writer's state after some commit ------------------


def test_restore_at_txids_matches_replay(run: Run) -> None:
    seed = 44
    run.make_db()
    daemon = run.daemon_with_snapshot()
    writer = run.writer(seed=seed, count=800, autocheckpoint=None)
    checkpointer = run.checkpointer("RESTART")
    assert writer.wait(timeout=60) == 0
    assert stop(checkpointer, timeout=10) == 0
    run.stop_daemon(daemon)

    assert len(segment_ranges(run.replica)) >= 3, segment_ranges(run.replica)
    txids = pick_txids(run.replica, random.Random(seed), n_random=4)
    check_restores_match_replay(run, seed, txids)


# -- 5. soak: random combinations of all of the above ----------------------------------------


@dataclass(frozen=True)
class Combo:
    """One randomized scenario."""

    seed: int
    count: int
    mode: str | None
    app_autocheckpoint: int | None
    checkpoint_pages: int
    truncate_pages: int
    reader_seconds: float
    restart: str  # "no", "sigterm", or "sigterm+truncate" (a TRUNCATE while it is down)

    @classmethod
    def draw(cls, rng: random.Random) -> Combo:
        return cls(
            seed=rng.randint(1, 10**6),
            count=rng.randint(600, 1500),
            mode=rng.choice([None, "PASSIVE", "FULL", "RESTART", "TRUNCATE"]),
            app_autocheckpoint=rng.choice([None, 0, 200]),
            checkpoint_pages=rng.choice([0, 300, 1000]),
            truncate_pages=rng.choice([1500, 10000]),
            reader_seconds=rng.choice([0.0, 0.0, 2.0]),
            restart=rng.choice(["no", "no", "sigterm", "sigterm+truncate"]),
        )

    @property
    def wal_may_restart_while_down(self) -> bool:
        return (
            self.restart == "sigterm+truncate"
            or self.mode is not None
            or self.app_autocheckpoint != 0
        )


@pytest.mark.slow
def test_random_interplay_soak(tmp_path: Path) -> None:
    """Random writers, checkpointers, readers and restarts; every failing scenario is listed."""
    master = int(os.environ.get("INTERPLAY_SEED", time.time_ns() % 2**32))
    rng = random.Random(master)
    deadline = time.monotonic() + SOAK_SECONDS
    failures: list[str] = []
    iteration = 0
    while time.monotonic() < deadline:
        combo = Combo.draw(rng)
        scenario = Run(tmp_path / str(iteration))
        scenario.tmp.mkdir()
        started = time.monotonic()
        try:
            _soak_once(scenario, combo)
            outcome = "ok"
        except AssertionError as exc:
            outcome = f"FAILED: {exc}"
            failures.append(f"#{iteration} {combo}: {exc}")
        finally:
            scenario.kill_all()
        print(f"#{iteration} {time.monotonic() - started:.1f}s {combo} {outcome.splitlines()[0]}")
        iteration += 1
    assert not failures, f"INTERPLAY_SEED={master}\n" + "\n\n".join(failures)


def _soak_once(run: Run, combo: Combo) -> None:
    run.make_db(checkpoint_pages=combo.checkpoint_pages, truncate_pages=combo.truncate_pages)
    daemon = run.daemon_with_snapshot()
    writer = run.writer(seed=combo.seed, count=combo.count, autocheckpoint=combo.app_autocheckpoint)
    checkpointer = run.checkpointer(combo.mode) if combo.mode else None
    if combo.restart != "no":
        run.wait_commits(combo.count // 4)
        run.stop_daemon(daemon)
        run.wait_commits(run.commits() + 100)
        if combo.restart == "sigterm+truncate":
            once = run.checkpointer("TRUNCATE", interval=0, log="while-down")
            assert once.wait(timeout=30) == 0
        run.wait_commits(run.commits() + 100)
        daemon = run.daemon_restarted()
    pinned: list[tuple[float, float]] = []  # times when a long reader held the WAL
    if combo.reader_seconds:
        run.wait_commits(combo.count // 2)
        reader, start = run.long_reader(combo.reader_seconds)
        assert reader.wait(timeout=30) == 0
        pinned.append((start, time.time_ns() + 0.5e9))
    assert writer.wait(timeout=120) == 0
    if checkpointer is not None:
        assert stop(checkpointer, timeout=10) == 0
    run.stop_daemon(daemon)

    assert_latest_restore_matches(run)
    assert not continuity_losses(run), continuity_losses(run)
    taken = len(snapshots(run.replica))
    if combo.restart == "no" or not combo.wal_may_restart_while_down:
        assert taken == 1, run.log_tail()
    else:
        assert taken in (1, 2), run.log_tail()
        if taken == 2:
            reasons = [str(e["reason"]) for e in run.events() if "reason" in e]
            assert any(NOT_RUNNING in r for r in reasons), reasons
    unpinned = [c for c in run.checkpoints() if not any(_overlaps(c, *p) for p in pinned)]
    bad = [c for c in unpinned if waited_busy(c) or too_slow(c)]
    assert not bad, explain(run, bad)
    collisions = [c for c in unpinned if c["busy"]]  # see test_external_checkpoints_are_not_starved
    assert len(collisions) <= max(2, len(unpinned) // 4), explain(run, collisions)
    if not pinned:
        assert worst_commit_gap(run.wlog) < COMMIT_BOUND
    txids = pick_txids(run.replica, random.Random(combo.seed), n_random=2)
    check_restores_match_replay(run, combo.seed, txids)


def _overlaps(checkpoint: dict[str, Any], start_ns: float, end_ns: float) -> bool:
    begin = checkpoint["start_ns"]
    return bool(begin <= end_ns and begin + checkpoint["seconds"] * 1e9 >= start_ns)
