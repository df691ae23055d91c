"""Checkpoints and application impact: ``python -m bench.checkpoints`` from the repo root.

    python -m bench.checkpoints [--quick] [--rate 500] [--seconds 60] [--keep]
                                [--part {1,2,both}] [--truncate-rate 400]

Part 1, four configurations, each on a fresh database in its own temporary directory: a writer
process commits one 1024-byte random row per transaction at `rate` per second on a fixed
schedule (SQLite's defaults otherwise: ``synchronous`` FULL, busy timeout 30 s), logging for
every transaction when BEGIN was issued and when COMMIT returned (its commit latency).  The
application's ``wal_autocheckpoint`` is left at its default (1000) or set to 0, and replicad
runs (``replicad replicate -c CONFIG --metrics-addr 127.0.0.1:PORT``, default checkpoint
settings written out explicitly) or does not.  Meanwhile this process stats the ``-wal`` file
and reads its 32-byte header every 10 ms: peak and final size, and how many WAL generations
(distinct salts) it saw.  Once the writer is done and replicad has shipped its last commit,
its metrics are scraped (snapshots, continuity losses, checkpoints by mode, busy checkpoints,
WAL high-water), it gets SIGTERM (exit status must be 0), and ``replicad restore`` must give
exactly the source's rows (count and a digest of every row) with ``integrity_check`` ok.

Part 2, the Litestream comparison: a writer at 400 txn/s with the application's autocheckpoint
on, and another process running ``PRAGMA wal_checkpoint(TRUNCATE)`` (busy timeout 5000 ms)
every 2 s, first at 1 s, for 30 s (`--quick`: 10 s); once without replicad (the bar) and once
with it.  Per TRUNCATE: how long it took, whether it returned busy, the writer's worst commit
while it ran and the checkpoints replicad finished meanwhile (from its debug log); for the
writer: its worst commit and the total time spent in commits longer than 100 ms.

Deviations from what is expected (a snapshot besides the initial one, a lost continuity, a busy
checkpoint or TRUNCATE, a commit over 100 ms, a WAL that never restarts or peaks at over twice
the size it has without replicad) are printed as ANOMALY lines at the end; they are reported,
not fatal.  A run fails only when its numbers would be wrong (a child failed, the replica never
caught up, replicad exited non-zero, the restore differs from the source).

The benchmark process never holds a SQLite connection while it starts a child: every writer,
checkpointer and daemon is its own process, started with a clean environment.  Timestamps
across processes are CLOCK_MONOTONIC (system-wide on Linux) for durations and Unix time to
line events up with the daemon's log.  MB are 10**6 bytes.  Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench.common import (
    BenchError,
    Poller,
    event_time,
    init_db,
    log_events,
    machine,
    percentile,
    print_table,
)
from tests.measure import proc_usage
from tests.procs import (
    ROOT,
    Daemon,
    Metrics,
    clean_env,
    replicad,
    wait_for,
)
from tests.workload import paced

DEFAULT_RATE = 500.0
DEFAULT_SECONDS = 60.0
QUICK_SECONDS = 15.0
ROW_BYTES = 1024
#: How often the -wal file is looked at.
WAL_POLL_INTERVAL = 0.01
#: The Litestream comparison: writer rate, TRUNCATE period and busy timeout, run lengths.
TRUNCATE_RATE = 400.0
TRUNCATE_EVERY = 2.0
TRUNCATE_FIRST_AT = 1.0
TRUNCATE_BUSY_TIMEOUT_MS = 5000
TRUNCATE_SECONDS = 30.0
QUICK_TRUNCATE_SECONDS = 10.0
#: A commit slower than this is a stall (the Litestream figure counts time in such commits).
STALL_MS = 100.0
#: A commit slower than this is counted as a spike in the latency table.
SPIKE_MS = 20.0
#: replicad's settings, written out (they are its defaults).
DAEMON_SETTINGS = {
    "checkpoint_pages": 1000,
    "checkpoint_interval": 60.0,
    "truncate_pages": 10000,
    "checkpoint_timeout": 1.0,
    "sync_interval": 1.0,
}
#: Seconds allowed for the daemon's first snapshot and metrics endpoint, and for its catch-up.
START_TIMEOUT = 30.0
CATCH_UP_TIMEOUT = 30.0
#: Idle time between the daemon's first snapshot and the first commit.
IDLE_BEFORE_WRITES = 1.0
#: The daemon's first snapshot is TXID 1, so writer commit k is replica TXID k + 1.
TXID_OFFSET = 1
_WAL_HEADER = 32


# -- child processes: the writer and the external checkpointer --------------------------------


def _child_write(
    db: Path, log: Path, *, rate: float, count: int, autocheckpoint: int | None
) -> None:
    """Commit `count` one-row transactions on an absolute schedule; log when each began/ended.

    Log lines: ``k begin_unix_ns begin_mono_ns insert_mono_ns end_mono_ns``, written once at
    the end so the log costs the measured transactions nothing.  The INSERT of a deferred
    transaction waits for the write lock; COMMIT writes and fsyncs the WAL (restarting it first
    when it was fully checkpointed) and runs the application's autocheckpoint.
    """
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    if autocheckpoint is not None:
        conn.execute(f"PRAGMA wal_autocheckpoint = {int(autocheckpoint)}")
    lines = []
    try:
        for k in paced(range(1, count + 1), rate):
            payload = os.urandom(ROW_BYTES)
            wall, begin = time.time_ns(), time.monotonic_ns()
            conn.execute("BEGIN")
            conn.execute("INSERT INTO rows(payload) VALUES (?)", (payload,))
            inserted = time.monotonic_ns()
            conn.execute("COMMIT")
            lines.append(f"{k} {wall} {begin} {inserted} {time.monotonic_ns()}\n")
    finally:
        conn.close()
        log.write_text("".join(lines))


def _child_truncate(db: Path, log: Path, *, every: float, first_at: float, seconds: float) -> None:
    """``PRAGMA wal_checkpoint(TRUNCATE)`` at first_at, first_at + every, ... up to `seconds`.

    Log lines: ``start_unix_ns start_mono_ns end_mono_ns busy log_frames checkpointed``.
    """
    conn = sqlite3.connect(db, isolation_level=None, timeout=TRUNCATE_BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {TRUNCATE_BUSY_TIMEOUT_MS}")
    lines = []
    start = time.monotonic()
    try:
        at = first_at
        while at <= seconds:
            delay = start + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            wall, begin = time.time_ns(), time.monotonic_ns()
            busy, frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            lines.append(f"{wall} {begin} {time.monotonic_ns()} {busy} {frames} {done}\n")
            at += every
    finally:
        conn.close()
        log.write_text("".join(lines))


def _start_child(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.checkpoints", *args], env=clean_env(), cwd=ROOT
    )


def start_writer(
    db: Path, log: Path, *, rate: float, count: int, autocheckpoint: int | None
) -> subprocess.Popen[bytes]:
    """The writer process (see `_child_write`)."""
    args = ["write", str(db), str(log), "--rate", str(rate), "--count", str(count)]
    if autocheckpoint is not None:
        args += ["--autocheckpoint", str(autocheckpoint)]
    return _start_child(*args)


def start_truncator(db: Path, log: Path, *, seconds: float) -> subprocess.Popen[bytes]:
    """The external TRUNCATE checkpointer (see `_child_truncate`)."""
    return _start_child(
        "truncate", str(db), str(log), "--every", str(TRUNCATE_EVERY),
        "--first-at", str(TRUNCATE_FIRST_AT), "--seconds", str(seconds),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Txn:
    """One writer transaction."""

    k: int
    begin_unix_ns: int
    begin_ns: int
    #: When the INSERT returned: the write lock was held from then on.
    insert_ns: int
    end_ns: int

    @property
    def ms(self) -> float:
        """Commit latency: BEGIN issued to COMMIT returned."""
        return (self.end_ns - self.begin_ns) / 1e6

    @property
    def lock_ms(self) -> float:
        """BEGIN + INSERT: mostly waiting for the write lock."""
        return (self.insert_ns - self.begin_ns) / 1e6


def read_txns(log: Path) -> list[Txn]:
    """The writer's log."""
    return [Txn(*map(int, line.split())) for line in log.read_text().splitlines()]


@dataclass(frozen=True, slots=True)
class Truncate:
    """One external ``wal_checkpoint(TRUNCATE)``."""

    start_unix_ns: int
    start_ns: int
    end_ns: int
    busy: bool
    log_frames: int
    checkpointed: int

    @property
    def ms(self) -> float:
        """How long the PRAGMA took."""
        return (self.end_ns - self.start_ns) / 1e6


def read_truncates(log: Path) -> list[Truncate]:
    """The external checkpointer's log."""
    out = []
    for line in log.read_text().splitlines():
        wall, begin, end, busy, frames, done = map(int, line.split())
        out.append(Truncate(wall, begin, end, bool(busy), frames, done))
    return out


# -- watching the -wal file -------------------------------------------------------------------


class WalWatch:
    """Peak and last size of a -wal file, and the distinct WAL generations (salts) it showed.

    Reading the -wal file is safe next to SQLite: it keeps no locks on it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.peak = 0
        self.last = 0
        self.samples = 0
        self.salts: set[bytes] = set()
        self.truncations = 0
        self._lock = threading.Lock()

    def poll(self) -> None:
        """Stat the file and read its header once."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            size, header = 0, b""
        else:
            try:
                size = os.fstat(fd).st_size
                header = os.pread(fd, _WAL_HEADER, 0)
            finally:
                os.close(fd)
        with self._lock:
            if size < self.last and size < _WAL_HEADER:
                self.truncations += 1
            self.peak = max(self.peak, size)
            self.last = size
            self.samples += 1
            if len(header) == _WAL_HEADER:
                self.salts.add(header[16:24])


# -- replicad ------------------------------------------------------------------------------


def start_replicad(root: Path) -> Daemon:
    """replicad on root/app.db -> root/replica, with `DAEMON_SETTINGS` and debug logs (the
    debug level logs every checkpoint it runs, with its mode, busy flag and duration).
    """
    config = root / "replicad.toml"
    settings = "".join(f"{k} = {v}\n" for k, v in DAEMON_SETTINGS.items())
    config.write_text(
        f"[[databases]]\npath = '{root / 'app.db'}'\n{settings}"
        f"[[databases.replicas]]\nurl = '{(root / 'replica').as_uri()}'\n"
    )
    return Daemon.start(["-c", str(config), "--log-level", "debug"], root / "daemon.log")


def wait_ready(daemon: Daemon) -> None:
    """Until the first snapshot is taken and the metrics endpoint answers."""

    def ready() -> bool:
        daemon.check_running(BenchError)
        return daemon.metric("replicad_snapshots_total") >= 1

    wait_for(ready, START_TIMEOUT, "replicad's first snapshot", log=daemon.log, error=BenchError)


def wait_shipped(daemon: Daemon, commits: int) -> Metrics:
    """Until the replica holds the writer's last commit and nothing is pending; the scrape."""
    last: list[Metrics] = []

    def shipped() -> bool:
        last[:] = [daemon.metrics()]
        m = last[0]
        return (
            m.value("replicad_replica_txid") >= commits + TXID_OFFSET
            and m.value("replicad_replica_pending_bytes") == 0
        )

    what = f"TXID {commits + TXID_OFFSET} in the replica"
    wait_for(shipped, CATCH_UP_TIMEOUT, what, log=daemon.log, error=BenchError)
    return last[0]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One checkpoint replicad ran, from its debug log."""

    unix: float
    mode: str
    busy: bool
    seconds: float


def daemon_checkpoints(log: Path) -> list[Checkpoint]:
    """The checkpoints in a daemon's JSON log (logged when each finished)."""
    return [
        Checkpoint(event_time(e), e["mode"], bool(e["busy"]), float(e["seconds"]))
        for e in log_events(log)
        if e.get("event") == "checkpoint"
    ]


@dataclass(frozen=True, slots=True)
class DaemonReport:
    """What replicad said about one run, and whether the restore matched the source."""

    snapshots: int
    continuity_losses: int
    checkpoints: dict[str, int]
    busy: int
    checkpoint_seconds: float
    high_water: int
    cpu_seconds: float
    events: list[Checkpoint]
    restore: str


def _finish_daemon(daemon: Daemon, root: Path, commits: int) -> DaemonReport:
    metrics = wait_shipped(daemon, commits)
    cpu = proc_usage(daemon.proc.pid).cpu_seconds
    daemon.stop(error=BenchError)
    return DaemonReport(
        snapshots=round(metrics.value("replicad_snapshots_total")),
        continuity_losses=round(metrics.value("replicad_continuity_losses_total")),
        checkpoints={
            mode: round(n)
            for mode, n in metrics.by_label("replicad_checkpoints_total", "mode").items()
        },
        busy=round(metrics.value("replicad_checkpoints_busy_total")),
        checkpoint_seconds=metrics.value("replicad_checkpoint_seconds_total"),
        high_water=round(metrics.value("replicad_wal_high_water_bytes")),
        cpu_seconds=cpu,
        events=daemon_checkpoints(daemon.log),
        restore=check_restore(root, commits),
    )


def _table_digest(db: Path) -> tuple[int, str, str]:
    """(rows, sha256 of every row in id order, integrity_check) of a database, read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        digest = hashlib.sha256()
        rows = 0
        for rowid, payload in conn.execute("SELECT id, payload FROM rows ORDER BY id"):
            digest.update(rowid.to_bytes(8, "big"))
            digest.update(payload)
            rows += 1
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    return rows, digest.hexdigest(), integrity


def check_restore(root: Path, commits: int) -> str:
    """Restore the replica and compare it with the source (all children have exited)."""
    out = root / "restored.db"
    result = replicad("restore", "-o", str(out), (root / "replica").as_uri())
    if result.returncode != 0:
        raise BenchError(f"restore failed: {result.stderr.strip()}")
    src_rows, src_digest, src_ok = _table_digest(root / "app.db")
    rows, digest, ok = _table_digest(out)
    if src_rows != commits:
        raise BenchError(f"the source has {src_rows} rows, the writer committed {commits}")
    if (rows, digest, ok) != (src_rows, src_digest, "ok") or src_ok != "ok":
        raise BenchError(
            f"restore differs: {rows} rows (source {src_rows}), digest match "
            f"{digest == src_digest}, integrity {ok!r} (source {src_ok!r})"
        )
    return f"= source ({rows:,} rows, integrity ok)"


# -- part 1: four configurations --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Configuration:
    """One cell of the 2 x 2: the application's autocheckpoint, and whether replicad runs."""

    autocheckpoint: int | None
    with_replicad: bool

    @property
    def label(self) -> str:
        """For the tables."""
        app = "app autocheckpoint 1000" if self.autocheckpoint is None else "app autocheckpoint 0"
        return f"{app}, " + ("replicad" if self.with_replicad else "no replicad")


CONFIGURATIONS = (
    Configuration(None, with_replicad=False),
    Configuration(None, with_replicad=True),
    Configuration(0, with_replicad=False),
    Configuration(0, with_replicad=True),
)


@dataclass(slots=True)
class RunResult:
    """One configuration's run."""

    config: Configuration
    txns: list[Txn]
    wal: WalWatch
    daemon: DaemonReport | None
    truncates: list[Truncate] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """First BEGIN to last COMMIT."""
        return (self.txns[-1].end_ns - self.txns[0].begin_ns) / 1e9

    def latencies(self) -> list[float]:
        """Commit latencies, sorted (ms)."""
        return sorted(t.ms for t in self.txns)


def run_configuration(
    root: Path, config: Configuration, *, rate: float, seconds: float
) -> RunResult:
    """One configuration in `root` (an empty directory)."""
    count = round(rate * seconds)
    init_db(root / "app.db")
    daemon = start_replicad(root) if config.with_replicad else None
    writer: subprocess.Popen[bytes] | None = None
    wal = WalWatch(root / "app.db-wal")
    try:
        if daemon is not None:
            wait_ready(daemon)
            time.sleep(IDLE_BEFORE_WRITES)
        with Poller([wal], interval=WAL_POLL_INTERVAL):
            writer = start_writer(
                root / "app.db", root / "writer.log",
                rate=rate, count=count, autocheckpoint=config.autocheckpoint,
            )  # fmt: skip
            if writer.wait(timeout=seconds * 3 + 60) != 0:
                raise BenchError(f"the writer failed with status {writer.returncode}")
        report = _finish_daemon(daemon, root, count) if daemon is not None else None
    finally:
        _kill(writer, daemon.proc if daemon else None)
    return RunResult(config, read_txns(root / "writer.log"), wal, report)


# -- part 2: the Litestream scenario ----------------------------------------------------------


def run_truncate_scenario(
    root: Path, *, with_replicad: bool, rate: float, seconds: float
) -> RunResult:
    """Writer at `rate` (app autocheckpoint on) + external TRUNCATE every 2 s."""
    count = round(rate * seconds)
    init_db(root / "app.db")
    daemon = start_replicad(root) if with_replicad else None
    writer = truncator = None
    wal = WalWatch(root / "app.db-wal")
    try:
        if daemon is not None:
            wait_ready(daemon)
            time.sleep(IDLE_BEFORE_WRITES)
        with Poller([wal], interval=WAL_POLL_INTERVAL):
            writer = start_writer(
                root / "app.db", root / "writer.log",
                rate=rate, count=count, autocheckpoint=None,
            )  # fmt: skip
            truncator = start_truncator(root / "app.db", root / "truncate.log", seconds=seconds)
            limit = seconds * 3 + 60
            if writer.wait(timeout=limit) != 0 or truncator.wait(timeout=limit) != 0:
                raise BenchError(
                    f"writer exited {writer.returncode}, truncator {truncator.returncode}"
                )
        report = _finish_daemon(daemon, root, count) if daemon is not None else None
    finally:
        _kill(writer, truncator, daemon.proc if daemon else None)
    return RunResult(
        Configuration(None, with_replicad),
        read_txns(root / "writer.log"),
        wal,
        report,
        read_truncates(root / "truncate.log"),
    )


def _kill(*procs: subprocess.Popen[bytes] | None) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


# -- analysis ---------------------------------------------------------------------------------


def overlaps_checkpoint(txn: Txn, events: Sequence[Checkpoint], *, margin: float = 0.05) -> bool:
    """True if the transaction ran while replicad was inside a checkpoint step.

    A checkpoint is logged when it ends, with the seconds its PRAGMAs took; the writer hold
    sits between them, so the window is [end - seconds - margin, end + margin].
    """
    begin = txn.begin_unix_ns / 1e9
    end = begin + txn.ms / 1e3
    return any(e.unix - e.seconds - margin <= end and begin <= e.unix + margin for e in events)


def stall_seconds(txns: Sequence[Txn]) -> float:
    """Total time the writer spent in commits longer than STALL_MS."""
    return sum(t.ms for t in txns if t.ms > STALL_MS) / 1e3


# -- report -----------------------------------------------------------------------------------


def _mb(n: float) -> float:
    return round(n / 1e6, 1)


def wal_latency_rows(results: Sequence[RunResult]) -> list[list[object]]:
    """Table 1: the WAL and the writer's commit latency per configuration."""
    rows: list[list[object]] = []
    for r in results:
        lat = r.latencies()
        rows.append([
            r.config.label,
            len(r.txns),
            round(len(r.txns) / r.seconds),
            _mb(r.wal.peak),
            _mb(r.wal.last),
            len(r.wal.salts),
            round(percentile(lat, 0.5), 2),
            round(percentile(lat, 0.99), 1),
            round(lat[-1], 1),
            sum(x > SPIKE_MS for x in lat),
            sum(x > STALL_MS for x in lat),
            _split(r.txns, STALL_MS),
        ])  # fmt: skip
    return rows


WAL_LATENCY_HEADERS = (
    "configuration",
    "commits",
    "txn/s",
    "peak WAL (MB)",
    "WAL at end (MB)",
    "WAL generations",
    "commit p50 (ms)",
    "p99",
    "max",
    f"commits > {SPIKE_MS:g} ms",
    f"> {STALL_MS:g} ms",
    "of which lock wait / in COMMIT",
)


def _split(txns: Sequence[Txn], over_ms: float) -> str:
    """Of the commits slower than `over_ms`: how many spent most of it waiting for the write
    lock (BEGIN + INSERT), and how many inside COMMIT (WAL write, fsync, restart,
    autocheckpoint).
    """
    slow = [t for t in txns if t.ms > over_ms]
    lock = sum(t.lock_ms > t.ms / 2 for t in slow)
    return f"{lock} / {len(slow) - lock}" if slow else "-"


def daemon_rows(results: Sequence[RunResult]) -> list[list[object]]:
    """Table 2: what replicad reported in each run it ran in."""
    rows: list[list[object]] = []
    for r in results:
        d = r.daemon
        if d is None:
            continue
        slow = [t for t in r.txns if t.ms > SPIKE_MS]
        during = sum(overlaps_checkpoint(t, d.events) for t in slow)
        rows.append([
            r.config.label,
            d.snapshots,
            d.continuity_losses,
            d.checkpoints.get("PASSIVE", 0),
            d.checkpoints.get("TRUNCATE", 0),
            d.busy,
            round(d.checkpoint_seconds, 2),
            _mb(d.high_water),
            f"{during} of {len(slow)}",
            round(d.cpu_seconds, 1),
            d.restore,
        ])  # fmt: skip
    return rows


DAEMON_HEADERS = (
    "configuration",
    "snapshots",
    "continuity losses",
    "PASSIVE",
    "TRUNCATE",
    "busy",
    "checkpoint s",
    "WAL high-water (MB)",
    f"commits > {SPIKE_MS:g} ms during a replicad checkpoint",
    "daemon CPU-s",
    "restore",
)


def _during(txns: Sequence[Txn], t: Truncate) -> float:
    """The writer's worst commit that overlapped TRUNCATE `t` (ms; 0 if none)."""
    return max((x.ms for x in txns if x.begin_ns <= t.end_ns and x.end_ns >= t.start_ns), default=0)


def _replicad_during(events: Sequence[Checkpoint], t: Truncate) -> str:
    """replicad's checkpoints that ended while TRUNCATE `t` ran or up to 0.1 s after it:
    how many, and how many of them were busy.
    """
    start = t.start_unix_ns / 1e9
    end = start + t.ms / 1e3 + 0.1
    hits = [e for e in events if start <= e.unix <= end]
    return f"{len(hits)} ({sum(e.busy for e in hits)} busy)" if hits else "-"


def truncate_rows(without: RunResult, with_: RunResult) -> list[list[object]]:
    """Table 3: each TRUNCATE, side by side."""
    rows: list[list[object]] = []
    start, start_with = without.txns[0].begin_ns, with_.txns[0].begin_ns
    events = with_.daemon.events if with_.daemon else []
    for i, (a, b) in enumerate(zip(without.truncates, with_.truncates, strict=False), 1):
        rows.append([
            i,
            round((a.start_ns - start) / 1e9, 1),
            round(a.ms, 1),
            a.busy,
            round(_during(without.txns, a), 1),
            round((b.start_ns - start_with) / 1e9, 1),
            round(b.ms, 1),
            b.busy,
            round(_during(with_.txns, b), 1),
            _replicad_during(events, b),
        ])  # fmt: skip
    return rows


TRUNCATE_HEADERS = (
    "#",
    "no replicad: at (s)",
    "TRUNCATE ms",
    "busy",
    "worst commit during (ms)",
    "replicad: at (s)",
    "TRUNCATE ms",
    "busy",
    "worst commit during (ms)",
    "replicad checkpoints during",
)


def truncate_summary_rows(results: Sequence[RunResult], seconds: float) -> list[list[object]]:
    """Table 4: the scenario's summary, with the published Litestream figure."""
    rows: list[list[object]] = []
    for r in results:
        ms = sorted(t.ms for t in r.truncates)
        d = r.daemon
        rows.append([
            "replicad" if d else "no replicad (the bar)",
            len(r.truncates),
            sum(t.busy for t in r.truncates),
            round(percentile(ms, 0.5), 1),
            round(ms[-1], 1),
            len(r.txns),
            round(max(t.ms for t in r.txns), 1),
            round(stall_seconds(r.txns), 2),
            _mb(r.wal.peak),
            d.snapshots if d else "-",
            d.continuity_losses if d else "-",
            f"{d.busy} of {sum(d.checkpoints.values())}" if d else "-",
            d.restore if d else "-",
        ])  # fmt: skip
    n = round((seconds - TRUNCATE_FIRST_AT) / TRUNCATE_EVERY) + 1
    rows.append([
        "Litestream 0.5.17 (published, 30 s run)", "-", "all", 5000, 5000, "-", "-",
        "20 of 30 s", "-", "-", "-", "-", f"(this run: {n} TRUNCATEs)",
    ])  # fmt: skip
    return rows


TRUNCATE_SUMMARY_HEADERS = (
    "run",
    "TRUNCATEs",
    "busy",
    "TRUNCATE p50 (ms)",
    "max (ms)",
    "commits",
    "worst commit (ms)",
    f"stalled in commits > {STALL_MS:g} ms (s)",
    "peak WAL (MB)",
    "snapshots",
    "continuity losses",
    "replicad busy checkpoints",
    "restore",
)


def anomalies(results: Sequence[RunResult], bar: RunResult | None = None) -> list[str]:
    """What deviates from the expected: a snapshot other than the initial one, a lost
    continuity, a busy checkpoint, a busy TRUNCATE, a writer stall, an unbounded WAL.
    """
    out = []
    for r in results:
        name = r.config.label + (" + external TRUNCATE" if r.truncates else "")
        d = r.daemon
        if d is not None:
            if d.snapshots != 1:
                out.append(f"{name}: {d.snapshots} snapshots (expected only the initial one)")
            if d.continuity_losses:
                out.append(f"{name}: {d.continuity_losses} continuity losses")
            if d.busy:
                busy = [e for e in d.events if e.busy]
                out.append(
                    f"{name}: replicad reported {d.busy} busy checkpoint(s) "
                    f"(modes {sorted({e.mode for e in busy})})"
                )
            if r.wal.salts and len(r.wal.salts) < 2:
                out.append(f"{name}: the WAL never restarted (peak {_mb(r.wal.peak)} MB)")
        busy_truncates = sum(t.busy for t in r.truncates)
        if busy_truncates:
            out.append(f"{name}: {busy_truncates} TRUNCATE(s) returned busy")
        stalls = [t.ms for t in r.txns if t.ms > STALL_MS]
        if stalls:
            out.append(
                f"{name}: {len(stalls)} commit(s) over {STALL_MS:g} ms, worst {max(stalls):.0f} "
                f"ms, {sum(stalls) / 1e3:.2f} s in all (lock wait / in COMMIT: "
                f"{_split(r.txns, STALL_MS)})"
            )
    if bar is not None:
        for r in results:
            if r.daemon is not None and r.wal.peak > 2 * bar.wal.peak:
                out.append(
                    f"{r.config.label}: peak WAL {_mb(r.wal.peak)} MB, over twice the "
                    f"{_mb(bar.wal.peak)} MB without replicad"
                )
    return out


def _print_anomalies(lines: Sequence[str]) -> None:
    print()
    if not lines:
        print("anomalies: none")
    for line in lines:
        print(f"ANOMALY: {line}")


# -- main -------------------------------------------------------------------------------------


def _in_tempdir(keep: bool, fn: Callable[[Path], RunResult]) -> RunResult:
    root = Path(tempfile.mkdtemp(prefix="replicad-ckpt-"))
    try:
        return fn(root)
    finally:
        if keep:
            print(f"run directory kept: {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the parts asked for, check them and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="part 1 transactions/s")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="part 1 duration")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_SECONDS:g} s per configuration, {QUICK_TRUNCATE_SECONDS:g} s of TRUNCATEs",
    )
    parser.add_argument(
        "--part", choices=("1", "2", "both"), default="both", help="which part to run"
    )
    parser.add_argument(
        "--truncate-rate",
        type=float,
        default=TRUNCATE_RATE,
        help="part 2 writer transactions/s (default: %(default)g)",
    )
    parser.add_argument("--keep", action="store_true", help="keep each run's directory")
    args = parser.parse_args(argv)
    seconds = QUICK_SECONDS if args.quick else args.seconds
    trunc_seconds = QUICK_TRUNCATE_SECONDS if args.quick else TRUNCATE_SECONDS
    started = time.monotonic()
    print(machine())
    found: list[str] = []
    if args.part in ("1", "both"):
        found += _part1(args.rate, seconds, keep=args.keep)
    if args.part in ("2", "both"):
        found += _part2(args.truncate_rate, trunc_seconds, keep=args.keep)
    _print_anomalies(found)
    print(f"\ntotal wall time {time.monotonic() - started:.0f} s")


def _part1(rate: float, seconds: float, *, keep: bool) -> list[str]:
    print(
        f"Part 1: {rate:g} txn/s for {seconds:g} s per configuration, one {ROW_BYTES}-byte "
        f"random row per transaction; -wal sampled every {WAL_POLL_INTERVAL * 1000:g} ms; "
        f"replicad settings {DAEMON_SETTINGS}",
        flush=True,
    )
    results = []
    for config in CONFIGURATIONS:
        run = partial(run_configuration, config=config, rate=rate, seconds=seconds)
        results.append(_in_tempdir(keep, run))
        print(f"  done: {config.label}", flush=True)
    print()
    print_table(WAL_LATENCY_HEADERS, wal_latency_rows(results))
    print()
    print_table(DAEMON_HEADERS, daemon_rows(results))
    print()
    return anomalies(results, bar=results[0])


def _part2(rate: float, seconds: float, *, keep: bool) -> list[str]:
    print(
        f"Part 2: writer at {rate:g} txn/s (app autocheckpoint on) for {seconds:g} s; another "
        f"process runs wal_checkpoint(TRUNCATE) (busy_timeout {TRUNCATE_BUSY_TIMEOUT_MS} ms) "
        f"every {TRUNCATE_EVERY:g} s from {TRUNCATE_FIRST_AT:g} s",
        flush=True,
    )
    scenario = []
    for with_replicad in (False, True):
        run = partial(
            run_truncate_scenario, with_replicad=with_replicad, rate=rate, seconds=seconds
        )
        scenario.append(_in_tempdir(keep, run))
        print(f"  done: {'with' if with_replicad else 'without'} replicad", flush=True)
    print()
    print_table(TRUNCATE_HEADERS, truncate_rows(scenario[0], scenario[1]))
    print()
    print_table(TRUNCATE_SUMMARY_HEADERS, truncate_summary_rows(scenario, seconds))
    print()
    print_table(WAL_LATENCY_HEADERS, wal_latency_rows(scenario))
    return anomalies(scenario, bar=scenario[0])


def _child_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write")
    write.add_argument("db", type=Path)
    write.add_argument("log", type=Path)
    write.add_argument("--rate", type=float, required=True)
    write.add_argument("--count", type=int, required=True)
    write.add_argument("--autocheckpoint", type=int)
    trunc = sub.add_parser("truncate")
    trunc.add_argument("db", type=Path)
    trunc.add_argument("log", type=Path)
    trunc.add_argument("--every", type=float, required=True)
    trunc.add_argument("--first-at", type=float, required=True)
    trunc.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    if args.command == "write":
        _child_write(
            args.db, args.log, rate=args.rate, count=args.count, autocheckpoint=args.autocheckpoint
        )
    else:
        _child_truncate(
            args.db, args.log, every=args.every, first_at=args.first_at, seconds=args.seconds
        )


CHILD_COMMANDS = ("write", "truncate")

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in CHILD_COMMANDS:
        _child_main(sys.argv[1:])
    else:
        main()
