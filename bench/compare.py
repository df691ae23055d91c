"""replicad against Litestream, side by side: ``python -m bench.compare [--quick] [--keep]``.

One `rclone serve s3` on 127.0.0.1 behind a request-counting proxy (`bench.s3cost`'s
`CountingProxy`, a `tests.faultproxy.FaultProxy` without faults); each replicator replicates
through the proxy, every restore and the raw downloads talk to the server directly.  The same
workloads run against ``replicad replicate`` and ``litestream replicate`` (`bench.litestream`),
each on a fresh database and a fresh prefix of one bucket, both at their default settings with
a 1 s upload interval (replicad's ``sync_interval``, Litestream's ``sync-interval``), one tool
at a time, alternating.  Ground truth is always the writer's own log of its commits (`k`, when
COMMIT was issued, when it returned; `bench.common`'s writer, or the history writer below).

1. SIGKILL: the replicator starts on a fresh database; 1.5 s after its first snapshot a writer
   commits one 1024-byte random row per transaction at 100 txn/s; after a random 2-5 s
   (1.5-3 s with `--quick`; the same draws for both tools) the replicator gets SIGKILL.  The
   writer's last commit that had returned by then is the last committed row; the tool's own
   restore then tells the last restored row.  Lost = the rows between them and the time
   between their two commits.  5 kills per tool (2 with `--quick`).
2. SIGTERM: the same writer for 3 s; the moment its last commit is in its log, SIGTERM.  The
   restore must hold every row.  2 runs per tool (1).
3. Steady cost: 500 txn/s for 60 s (15 s), 2 s to drain, then 60 s (15 s) idle.  CPU time and
   peak RSS of the replicator from /proc, requests by S3 operation and request body bytes at
   the proxy, the -wal file's peak size (sampled every 50 ms); then SIGTERM, and a restore
   that must hold every row (a NOTE before the tables says otherwise).
4. Restore: a history of large rows (100 kB random, as fast as the writer goes, 2,500 of them:
   about 250 MB; 500 with `--quick`) then a tail of small transactions (each inserts a 100-byte
   row and updates one earlier large row's fixed-width `ver` column, so it rewrites one leaf
   page of the old data) at 250 txn/s, 10,000 of them (1,000).  The replicator runs
   throughout, then gets SIGTERM.  Restored: the latest state and the state at a moment in the
   middle of the tail (by timestamp, both tools; by TXID too for replicad), each timed as a
   child process and compared with downloading the same objects (the tool's own dry-run plan,
   matched against a LIST of its prefix) with aiobotocore, 8 GETs at a time (both tools'
   restore parallelism), to local files in this process.  Each restored database is checked
   row by row against the writer's log: exactly the transactions 1..r, with r the target (the
   latest), or for a timestamp, r no later than the last commit at or before the moment; how
   early it lands is reported.
5. App impact: the writer's COMMIT latency (issued to returned) during workload 3, and in a
   third run of the same writer with no replicator.

MB are 10**6 bytes.  Results and how to read them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from bench import litestream
from bench.common import (
    BenchError,
    Commit,
    PeakSize,
    Poller,
    RunFiles,
    init_db,
    machine,
    percentile,
    print_table,
    s3_env,
    s3_url,
    start_writer,
)
from bench.s3cost import OPERATIONS, CountingProxy, Tally
from tests.measure import MeasuredRun, ProcUsage, proc_usage, run_measured
from tests.procs import ROOT, clean_env, log_tail, start_daemon, wait_for_async
from tests.s3servers import (
    S3Server,
    create_bucket,
    download,
    list_sizes,
    raw_client,
    start_rclone,
    unique_bucket,
)
from tests.workload import paced

ROW_BYTES = 1024
#: Seconds from a replicator's first snapshot to the first commit, so each run starts against
#: an idle replicator (more than the 1 s upload interval).
IDLE_BEFORE_WRITES = 1.5
START_TIMEOUT = 30.0
#: Seconds a replicator may take to exit after SIGTERM.
STOP_TIMEOUT = 60.0
RESTORE_TIMEOUT = 600.0
KILL_RATE = 100.0
SHUTDOWN_RATE = 100.0
SHUTDOWN_SECONDS = 3.0
STEADY_RATE = 500.0
#: Seconds after the writer's last commit still counted in the write phase: the last upload.
DRAIN = 2.0
WAL_POLL_INTERVAL = 0.05
HISTORY_BASE_BYTES = 100_000
HISTORY_TAIL_BYTES = 100
HISTORY_TAIL_RATE = 250.0
#: Width of the `ver` column, so an update never changes a record's size (SQLite then
#: overwrites the cell in place and leaves the overflow pages of the large row alone).
VER_WIDTH = 10
#: GETs in flight in the raw download: both tools' default restore parallelism.
DOWNLOAD_CONCURRENCY = 8
SEED = 20_251_124


@dataclass(frozen=True, slots=True)
class Settings:
    """How much of each workload to run."""

    kills: int
    kill_window: tuple[float, float]
    shutdowns: int
    steady_seconds: float
    idle_seconds: float
    base_rows: int
    tail_txns: int


FULL = Settings(
    kills=5,
    kill_window=(2.0, 5.0),
    shutdowns=2,
    steady_seconds=60.0,
    idle_seconds=60.0,
    base_rows=2_500,
    tail_txns=10_000,
)
QUICK = Settings(
    kills=2,
    kill_window=(1.5, 3.0),
    shutdowns=1,
    steady_seconds=15.0,
    idle_seconds=15.0,
    base_rows=500,
    tail_txns=1_000,
)


# -- one replicator's run: its files, its prefix --------------------------------------------


@dataclass(frozen=True, slots=True)
class Run(RunFiles):
    """One replicator's life: a fresh database and a fresh prefix of the bucket."""

    server: S3Server
    #: Where the server keeps the bucket's objects as files (rclone serves a directory).
    bucket_dir: Path
    bucket: str
    prefix: str
    proxy_url: str

    @property
    def log(self) -> Path:
        """The replicator's log."""
        return self.root / "replicator.log"

    @property
    def replica_dir(self) -> Path:
        """The prefix's objects as the server's files (read to see a snapshot arrive)."""
        return self.bucket_dir / self.prefix


class Tool(Protocol):
    """A replicator under test, driven only through its command line."""

    name: str

    def start(self, run: Run) -> subprocess.Popen[bytes]:
        """Start replicating `run.db` to `run.prefix` through the proxy."""

    def started(self, run: Run) -> bool:
        """Whether its first snapshot is in the replica."""

    def restore_command(
        self,
        run: Run,
        out: Path,
        *,
        timestamp: str | None = None,
        txid: int | None = None,
        dry_run: bool = False,
        extra: Sequence[str] = (),
    ) -> list[str]:
        """Its restore of the replica into `out` (from the server directly)."""

    def restore_env(self, run: Run) -> dict[str, str]:
        """The environment its restore runs with (on top of `tests.procs.clean_env`)."""

    def plan_keys(self, dry_run_stdout: str) -> list[str]:
        """Keys, relative to the prefix, that a dry-run says a restore reads."""


class Replicad:
    """``replicad replicate DB s3://...`` and ``replicad restore``, at default settings."""

    name = "replicad"

    def start(self, run: Run) -> subprocess.Popen[bytes]:
        """The daemon as a child process, logging JSON to `run.log`."""
        url = s3_url(run.server, run.bucket, run.prefix, endpoint=run.proxy_url)
        return start_daemon([str(run.db), url], run.log, env=s3_env(run.server, run.root))

    def started(self, run: Run) -> bool:
        """Its snapshot is under ``snapshots/``."""
        snapshots = run.replica_dir / "snapshots"
        return snapshots.is_dir() and any(snapshots.iterdir())

    def restore_command(
        self,
        run: Run,
        out: Path,
        *,
        timestamp: str | None = None,
        txid: int | None = None,
        dry_run: bool = False,
        extra: Sequence[str] = (),
    ) -> list[str]:
        """``replicad restore -o OUT URL`` at its defaults (``--integrity-check auto``: the
        checksum chain's proof, and no integrity_check, for a format v2 replica).
        """
        url = s3_url(run.server, run.bucket, run.prefix)
        cmd = [sys.executable, "-m", "replicad", "restore", "-o", str(out), url, *extra]
        if timestamp is not None:
            cmd += ["--timestamp", timestamp]
        if txid is not None:
            cmd += ["--txid", str(txid)]
        if dry_run:
            cmd.append("--dry-run")
        return cmd

    def restore_env(self, run: Run) -> dict[str, str]:
        """Credentials through the standard variables, no AWS config files."""
        return s3_env(run.server, run.root)

    def plan_keys(self, dry_run_stdout: str) -> list[str]:
        """The ``objects`` of ``--dry-run``'s JSON."""
        return [o["key"] for o in json.loads(dry_run_stdout)["objects"]]

    @staticmethod
    def plan_txid(dry_run_stdout: str) -> int:
        """The TXID a dry-run's plan restores to."""
        return int(json.loads(dry_run_stdout)["target_txid"])


class Litestream:
    """``litestream replicate -config FILE`` and ``litestream restore``, at default settings
    except ``sync-interval: 1s`` (written out; it is the default).
    """

    name = "Litestream"

    def start(self, run: Run) -> subprocess.Popen[bytes]:
        """Write the daemon's config (endpoint: the proxy) and start it."""
        config = run.root / "litestream.yml"
        litestream.write_config(config, run.db, self._target(run, run.proxy_url))
        return litestream.start(config, run.log, self._env(run))

    def started(self, run: Run) -> bool:
        """Its snapshot level holds a file."""
        return litestream.started(run.replica_dir)

    def restore_command(
        self,
        run: Run,
        out: Path,
        *,
        timestamp: str | None = None,
        txid: int | None = None,
        dry_run: bool = False,
        extra: Sequence[str] = (),
    ) -> list[str]:
        """``litestream restore -o OUT -config FILE DB`` (endpoint: the server itself)."""
        if txid is not None or extra:
            raise ValueError("Litestream restores are by timestamp or latest here")
        config = run.root / "litestream-restore.yml"
        if not config.exists():
            litestream.write_config(config, run.db, self._target(run, run.server.endpoint_url))
        return litestream.restore_command(config, run.db, out, timestamp=timestamp, dry_run=dry_run)

    def restore_env(self, run: Run) -> dict[str, str]:
        """Litestream's own small environment (credentials are in the config)."""
        return self._env(run)

    def plan_keys(self, dry_run_stdout: str) -> list[str]:
        """The ``files`` of ``-dry-run -json``."""
        return litestream.plan_keys(dry_run_stdout)

    @staticmethod
    def _target(run: Run, endpoint: str) -> litestream.S3Target:
        server = run.server
        return litestream.S3Target(
            endpoint=endpoint,
            bucket=run.bucket,
            path=run.prefix,
            region=server.region,
            access_key_id=server.access_key_id,
            secret_access_key=server.secret_access_key,
        )

    @staticmethod
    def _env(run: Run) -> dict[str, str]:
        return litestream.environment(run.root, clean_env()["PATH"])


TOOLS: tuple[Tool, ...] = (Replicad(), Litestream())


@dataclass
class Bench:
    """The server, the proxy, the bucket, and the runs made so far."""

    root: Path
    server: S3Server
    proxy: CountingProxy
    bucket: str

    @property
    def bucket_dir(self) -> Path:
        """The bucket as a directory of `start_rclone`'s server."""
        return self.root / "s3" / "data" / self.bucket

    def new_run(self, tool: Tool, name: str) -> Run:
        """A fresh directory and prefix for `tool`'s run `name`."""
        slug = tool.name.lower()
        root = self.root / "runs" / slug / name
        root.mkdir(parents=True)
        return Run(
            root, self.server, self.bucket_dir, self.bucket, f"{slug}/{name}", self.proxy.url
        )


# -- small helpers ---------------------------------------------------------------------------


async def _start(tool: Tool, run: Run) -> subprocess.Popen[bytes]:
    """Start the replicator and wait for its first snapshot."""
    proc = tool.start(run)

    def ready() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"{tool.name} exited with {proc.returncode}\n{log_tail(run.log)}")
        return tool.started(run)

    try:
        await wait_for_async(
            ready, START_TIMEOUT, f"{tool.name}'s first snapshot", error=BenchError, interval=0.002
        )
    except BaseException:
        _kill(proc)
        raise
    return proc


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL and reap, if still running (cleanup)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


async def _stop(tool: Tool, run: Run, proc: subprocess.Popen[bytes]) -> tuple[int, float]:
    """SIGTERM; (exit status, seconds it took to exit)."""
    started = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        status = await asyncio.to_thread(proc.wait, STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise BenchError(f"{tool.name} did not exit after SIGTERM\n{log_tail(run.log)}") from None
    return status, time.perf_counter() - started


async def _run_writer(writer: subprocess.Popen[bytes], within: float) -> None:
    try:
        status = await asyncio.to_thread(writer.wait, within)
    except subprocess.TimeoutExpired:
        _kill(writer)
        raise BenchError(f"the writer did not finish within {within:.0f} s") from None
    if status != 0:
        raise BenchError(f"the writer failed with status {status}")


def read_log(log: Path) -> list[Commit]:
    """The writer's log in commit order; a last line cut short by a kill is skipped."""
    commits = []
    for line in log.read_text().splitlines():
        fields = line.split()
        if len(fields) == 3 and line.endswith(fields[2]):
            commits.append(Commit(*(int(f) for f in fields)))
    if [c.k for c in commits] != list(range(1, len(commits) + 1)):
        raise BenchError(f"{log} does not hold commits 1..n in order")
    return commits


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


async def _restore(cmd: list[str], env: dict[str, str], what: str) -> MeasuredRun:
    """A restore (or its dry run) as a measured child process; fails the run on error."""
    result = await asyncio.to_thread(run_measured, cmd, env=env, timeout=RESTORE_TIMEOUT)
    if result.returncode != 0:
        raise BenchError(f"{what} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def restored_rows(db: Path) -> tuple[int, int]:
    """(count, max id) of a restored database's ``rows``."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        count, top = conn.execute("SELECT count(*), coalesce(max(id), 0) FROM rows").fetchone()
    finally:
        conn.close()
    return int(count), int(top)


def _prefix_of(db: Path, what: str) -> int:
    """The k such that the restored `db` holds exactly rows 1..k; fails the run otherwise."""
    count, top = restored_rows(db)
    if count != top:
        raise BenchError(f"{what}: {count} rows but max id {top}: not a prefix of the commits")
    return top


def rfc3339(ns: int) -> str:
    """Unix nanoseconds as RFC 3339 UTC with nanoseconds, which both tools accept."""
    seconds, frac = divmod(ns, 10**9)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def _latencies_ms(commits: Sequence[Commit]) -> list[float]:
    return sorted((c.time_ns - c.start_ns) / 1e6 for c in commits)


def _rate(commits: Sequence[Commit]) -> float:
    return (len(commits) - 1) / ((commits[-1].time_ns - commits[0].time_ns) / 1e9)


# -- 1. SIGKILL ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KillResult:
    """One SIGKILL of a replicator."""

    tool: str
    trial: int
    kill_after: float
    #: The writer's last commit that had returned when the replicator was killed.
    last_committed: int
    last_restored: int
    seconds_lost: float
    restore: MeasuredRun

    @property
    def rows_lost(self) -> int:
        """Rows committed before the kill that the restore does not hold."""
        return max(self.last_committed - self.last_restored, 0)


async def kill_trial(bench: Bench, tool: Tool, trial: int, kill_after: float) -> KillResult:
    """Write at 100 txn/s, SIGKILL the replicator `kill_after` s into it, restore."""
    run = bench.new_run(tool, f"kill-{trial}")
    await asyncio.to_thread(init_db, run.db)
    proc = await _start(tool, run)
    writer = None
    try:
        await asyncio.sleep(IDLE_BEFORE_WRITES)
        count = round(KILL_RATE * (kill_after + 5))
        writer = start_writer(
            run.db, run.writer_log, rate=KILL_RATE, count=count, row_bytes=ROW_BYTES
        )
        await wait_for_async(
            lambda: _lines(run.writer_log) > 0,
            START_TIMEOUT,
            "the writer's first commit",
            error=BenchError,
            interval=0.002,
        )
        await asyncio.sleep(kill_after)
        kill_ns = time.time_ns()
        proc.kill()
        await asyncio.to_thread(proc.wait)
    finally:
        _kill(proc)
        _kill(writer)
    commits = read_log(run.writer_log)
    committed = [c for c in commits if c.time_ns <= kill_ns]
    out = run.root / "restored.db"
    restore = await _restore(tool.restore_command(run, out), tool.restore_env(run), "restore")
    last_restored = _prefix_of(out, f"{tool.name} kill {trial}")
    last = committed[-1]
    if last_restored >= last.k:
        lost = 0.0
    elif last_restored == 0:
        lost = (last.time_ns - commits[0].start_ns) / 1e9
    else:
        lost = (last.time_ns - commits[last_restored - 1].time_ns) / 1e9
    return KillResult(tool.name, trial, kill_after, last.k, last_restored, lost, restore)


# -- 2. SIGTERM ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShutdownResult:
    """One clean shutdown right after the last commit."""

    tool: str
    trial: int
    committed: int
    restored: int
    status: int
    stop_seconds: float


async def shutdown_trial(bench: Bench, tool: Tool, trial: int) -> ShutdownResult:
    """Write for 3 s; SIGTERM the moment the last commit is logged; restore."""
    run = bench.new_run(tool, f"term-{trial}")
    await asyncio.to_thread(init_db, run.db)
    proc = await _start(tool, run)
    writer = None
    count = round(SHUTDOWN_RATE * SHUTDOWN_SECONDS)
    try:
        await asyncio.sleep(IDLE_BEFORE_WRITES)
        writer = start_writer(
            run.db, run.writer_log, rate=SHUTDOWN_RATE, count=count, row_bytes=ROW_BYTES
        )
        await wait_for_async(
            lambda: _lines(run.writer_log) >= count,
            60,
            "the writer's last commit",
            error=BenchError,
            interval=0.002,
        )
        status, seconds = await _stop(tool, run, proc)
        await _run_writer(writer, 60)
    finally:
        _kill(proc)
        _kill(writer)
    out = run.root / "restored.db"
    await _restore(tool.restore_command(run, out), tool.restore_env(run), "restore")
    restored = _prefix_of(out, f"{tool.name} shutdown {trial}")
    return ShutdownResult(tool.name, trial, count, restored, status, seconds)


# -- 3. steady cost and 5. commit latency -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class SteadyResult:
    """Writes at 500 txn/s then idle, with one replicator (or none)."""

    tool: str
    commits: list[Commit]
    startup: Tally
    writes: Tally
    idle: Tally
    shutdown: Tally
    startup_usage: ProcUsage
    writes_cpu: float
    idle_cpu: float
    #: Length of the idle phase, for CPU per minute.
    idle_seconds: float
    #: Peak RSS up to the end of the writes (the whole run's is `total`).
    writes_usage: ProcUsage
    total: ProcUsage
    peak_wal_bytes: int
    end_wal_bytes: int
    status: int
    restored: int
    #: SIGTERM to exit after the idle phase: a clean stop with nothing pending.
    stop_seconds: float = 0.0


async def steady_run(bench: Bench, tool: Tool | None, settings: Settings) -> SteadyResult:
    """Workload 3 with `tool`, or with no replicator (workload 5's baseline)."""
    name = tool.name if tool is not None else "none"
    run = bench.new_run(tool, "steady") if tool is not None else _baseline_run(bench)
    await asyncio.to_thread(init_db, run.db)
    count = round(STEADY_RATE * settings.steady_seconds)
    proc = None
    writer = None
    wal = PeakSize(run.wal)
    try:
        t0 = bench.proxy.tally()
        if tool is not None:
            proc = await _start(tool, run)
            await asyncio.sleep(IDLE_BEFORE_WRITES)
        t1, u1 = bench.proxy.tally(), _usage(proc)
        with Poller([wal], interval=WAL_POLL_INTERVAL):
            writer = start_writer(
                run.db, run.writer_log, rate=STEADY_RATE, count=count, row_bytes=ROW_BYTES
            )
            await _run_writer(writer, settings.steady_seconds * 3 + 60)
            if proc is None:
                return _baseline_result(run, wal.peak, bench.proxy.tally())
            await asyncio.sleep(DRAIN)
            t2, u2 = bench.proxy.tally(), _usage(proc)
            await asyncio.sleep(settings.idle_seconds)
            t3, u3 = bench.proxy.tally(), _usage(proc)
        end_wal = run.wal.stat().st_size if run.wal.exists() else 0
        assert tool is not None
        status, stop_seconds = await _stop(tool, run, proc)
        t4 = bench.proxy.tally()
    finally:
        _kill(proc)
        _kill(writer)
    out = run.root / "restored.db"
    await _restore(tool.restore_command(run, out), tool.restore_env(run), "restore")
    restored = _prefix_of(out, f"{tool.name} steady")
    commits = read_log(run.writer_log)
    # Reported rather than fatal, so one surprise does not discard the other workloads.
    if status != 0:
        print(f"NOTE: {tool.name} exited with status {status} after the steady run")
    if restored != len(commits):
        print(f"NOTE: {tool.name} steady run restored {restored} of {len(commits)} rows")
    return SteadyResult(
        tool=name,
        commits=commits,
        startup=t1 - t0,
        writes=t2 - t1,
        idle=t3 - t2,
        shutdown=t4 - t3,
        startup_usage=u1,
        writes_cpu=u2.cpu_seconds - u1.cpu_seconds,
        idle_cpu=u3.cpu_seconds - u2.cpu_seconds,
        idle_seconds=settings.idle_seconds,
        writes_usage=u2,
        total=u3,
        peak_wal_bytes=wal.peak,
        end_wal_bytes=end_wal,
        status=status,
        restored=restored,
        stop_seconds=stop_seconds,
    )


def _baseline_run(bench: Bench) -> Run:
    root = bench.root / "runs" / "none" / "steady"
    root.mkdir(parents=True)
    return Run(root, bench.server, bench.bucket_dir, bench.bucket, "none", bench.proxy.url)


def _usage(proc: subprocess.Popen[bytes] | None) -> ProcUsage:
    return proc_usage(proc.pid) if proc is not None else ProcUsage(0.0, 0)


def _baseline_result(run: Run, peak_wal: int, now: Tally) -> SteadyResult:
    empty = now - now  # no requests (built from the proxy's own tally, whatever it counts)
    nothing = ProcUsage(0.0, 0)
    return SteadyResult(
        tool="none",
        commits=read_log(run.writer_log),
        startup=empty,
        writes=empty,
        idle=empty,
        shutdown=empty,
        startup_usage=nothing,
        writes_cpu=0.0,
        idle_cpu=0.0,
        idle_seconds=0.0,
        writes_usage=nothing,
        total=nothing,
        peak_wal_bytes=peak_wal,
        end_wal_bytes=run.wal.stat().st_size if run.wal.exists() else 0,
        status=0,
        restored=0,
    )


# -- 4. restore ------------------------------------------------------------------------------


def history_target(k: int, base_rows: int) -> int:
    """The large row that tail transaction `k` updates."""
    return 1 + (k * 7919) % base_rows


def expected_versions(base_rows: int, r: int) -> list[tuple[int, int]]:
    """(id, ver) of every row after history transactions 1..r, in id order."""
    ver = list(range(r + 1))
    for k in range(base_rows + 1, r + 1):
        ver[history_target(k, base_rows)] = k
    return [(i, ver[i]) for i in range(1, r + 1)]


def check_history(db: Path, base_rows: int, what: str) -> int:
    """The r such that `db` is exactly the history after transactions 1..r; fails otherwise."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = [(i, int(v)) for i, v in conn.execute("SELECT id, ver FROM rows ORDER BY id")]
    finally:
        conn.close()
    r = rows[-1][0] if rows else 0
    if rows != expected_versions(base_rows, r):
        raise BenchError(f"{what}: the restored rows are not the state after transaction {r}")
    return r


@dataclass(frozen=True, slots=True)
class RawDownload:
    """Downloading a list of objects with plain GETs."""

    objects: int
    bytes: int
    seconds: float


async def raw_download(run: Run, keys: Sequence[str] | None, dest: Path) -> RawDownload:
    """LIST the prefix, then GET `keys` (relative to it; None: every object) to files in `dest`,
    `DOWNLOAD_CONCURRENCY` at a time.  Timed from the LIST to the last byte written.
    """
    await asyncio.to_thread(dest.mkdir, parents=True)
    base = run.prefix + "/"
    async with raw_client(run.server) as s3:
        started = time.perf_counter()
        listed = await list_sizes(s3, run.bucket, base)
        wanted = list(listed) if keys is None else list(keys)
        missing = [k for k in wanted if k not in listed]
        if missing:
            raise BenchError(f"planned objects not in the listing of {base}: {missing[:3]}")
        wanted_keys = [base + k for k in wanted]
        size = await download(s3, run.bucket, wanted_keys, dest, concurrency=DOWNLOAD_CONCURRENCY)
        seconds = time.perf_counter() - started
    shutil.rmtree(dest)
    return RawDownload(len(wanted), size, seconds)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """One timed restore, its raw-download baseline and where it landed."""

    tool: str
    target: str
    raw: RawDownload
    restore: MeasuredRun
    #: The last transaction a correct restore may hold (the target).
    wanted: int
    restored: int
    #: Time from the last restored commit to the target's commit, ms (0 when exact).
    early_ms: float

    @property
    def ratio(self) -> float:
        """Restore wall time over raw download time."""
        return self.restore.wall_seconds / self.raw.seconds


@dataclass(frozen=True, slots=True)
class HistoryBuild:
    """What building the history cost and left behind."""

    tool: str
    commits: list[Commit]
    db_bytes: int
    replica: RawDownload
    requests: Tally
    cpu_seconds: float
    peak_rss_bytes: int
    status: int


async def restore_runs(
    bench: Bench, tool: Tool, settings: Settings
) -> tuple[HistoryBuild, list[RestoreResult]]:
    """Build the history with `tool` replicating, then restore latest and middle."""
    run = bench.new_run(tool, "restore")
    await asyncio.to_thread(_history_init, run.db)
    tally = bench.proxy.tally()
    proc = await _start(tool, run)
    writer = None
    try:
        await asyncio.sleep(IDLE_BEFORE_WRITES)
        writer = _start_history_writer(run, settings)
        await _run_writer(writer, 900)
        await asyncio.sleep(DRAIN)
        usage = proc_usage(proc.pid)
        status, _seconds = await _stop(tool, run, proc)
    finally:
        _kill(proc)
        _kill(writer)
    commits = read_log(run.writer_log)
    requests = bench.proxy.tally() - tally
    everything = await raw_download(run, None, run.root / "raw-all")
    build = HistoryBuild(
        tool.name,
        commits,
        run.db.stat().st_size,
        everything,
        requests,
        usage.cpu_seconds,
        usage.peak_rss_bytes,
        status,
    )
    base = settings.base_rows
    mid = base + settings.tail_txns // 2  # commit k = mid, list index mid - 1
    # A moment with no COMMIT in flight: after commit `mid` returned, before `mid + 1` began.
    moment = (commits[mid - 1].time_ns + commits[mid].start_ns) // 2
    stamp = rfc3339(moment)
    targets: list[tuple[str, dict[str, object], int]] = [
        ("latest", {}, len(commits)),
        ("middle, timestamp", {"timestamp": stamp}, mid),
    ]
    if isinstance(tool, Replicad):
        offset = Replicad.plan_txid(await _dry_run(tool, run, {})) - len(commits)
        targets.append(("middle, TXID", {"txid": mid + offset}, mid))
        targets.append(
            (
                "latest, + full integrity_check",
                {"extra": ["--integrity-check", "full"]},
                len(commits),
            )
        )
    results = []
    for n, (label, options, wanted) in enumerate(targets):
        keys = tool.plan_keys(await _dry_run(tool, run, options))
        raw = await raw_download(run, keys, run.root / f"raw-{n}")
        out = run.root / f"restored-{n}.db"
        restore = await _restore(
            tool.restore_command(run, out, **options),  # type: ignore[arg-type]
            tool.restore_env(run),
            f"{tool.name} restore ({label})",
        )
        restored = await asyncio.to_thread(check_history, out, base, f"{tool.name} {label}")
        if restored > wanted:
            raise BenchError(
                f"{tool.name} {label}: restored transaction {restored}, "
                f"committed after the target {wanted}"
            )
        early = (commits[wanted - 1].time_ns - commits[restored - 1].time_ns) / 1e6
        results.append(RestoreResult(tool.name, label, raw, restore, wanted, restored, early))
        out.unlink()
    return build, results


async def _dry_run(tool: Tool, run: Run, options: dict[str, object]) -> str:
    out = run.root / "dry-run.db"
    cmd = tool.restore_command(run, out, dry_run=True, **options)  # type: ignore[arg-type]
    return (await _restore(cmd, tool.restore_env(run), f"{tool.name} dry run")).stdout


def _history_init(db: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "bench.compare", "history-init", str(db)],
        env=clean_env(),
        cwd=ROOT,
        check=True,
        timeout=60,
    )


def _start_history_writer(run: Run, settings: Settings) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "bench.compare", "history", str(run.db), str(run.writer_log)]
    cmd += [str(settings.base_rows), str(settings.tail_txns)]
    return subprocess.Popen(cmd, env=clean_env(), cwd=ROOT)


def _history_schema(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE rows(id INTEGER PRIMARY KEY, ver TEXT, payload BLOB)")
    finally:
        conn.close()


def _history_write(db: Path, log_path: Path, base_rows: int, tail_txns: int) -> None:
    """Transactions 1..base_rows insert a large row each, as fast as they go; then each tail
    transaction inserts a small row and updates the `ver` of one large row, at a steady rate.
    Every transaction k inserts row k; `ver` holds the last k that wrote the row.
    """
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        with log_path.open("a", buffering=1) as log:

            def commit(k: int) -> None:
                tail = k > base_rows
                size = HISTORY_TAIL_BYTES if tail else HISTORY_BASE_BYTES
                conn.execute("BEGIN")
                conn.execute(
                    "INSERT INTO rows(id, ver, payload) VALUES (?, ?, ?)",
                    (k, f"{k:0{VER_WIDTH}d}", os.urandom(size)),
                )
                if tail:
                    conn.execute(
                        "UPDATE rows SET ver = ? WHERE id = ?",
                        (f"{k:0{VER_WIDTH}d}", history_target(k, base_rows)),
                    )
                start_ns = time.time_ns()
                conn.execute("COMMIT")
                log.write(f"{k} {time.time_ns()} {start_ns}\n")

            for k in range(1, base_rows + 1):
                commit(k)
            for k in paced(range(base_rows + 1, base_rows + tail_txns + 1), HISTORY_TAIL_RATE):
                commit(k)
    finally:
        conn.close()


# -- the whole benchmark ---------------------------------------------------------------------


@dataclass
class Results:
    """Everything measured."""

    settings: Settings
    kills: list[KillResult]
    shutdowns: list[ShutdownResult]
    steady: list[SteadyResult]
    builds: list[HistoryBuild]
    restores: list[RestoreResult]
    seconds: float = 0.0
    #: The machine's 1-minute load average at the start of each step and at the end.
    loads: list[float] = field(default_factory=list)


async def run_all(root: Path, settings: Settings, *, restore_only: bool = False) -> Results:
    """Every workload against both tools (only workload 4 with `restore_only`), with one
    server and one proxy.
    """
    progress = Progress()
    server = await asyncio.to_thread(start_rclone, root / "s3")
    try:
        bucket = unique_bucket()
        await create_bucket(server, bucket)
        proxy = CountingProxy(server.endpoint_url)
        await proxy.start()
        try:
            bench = Bench(root, server, proxy, bucket)
            results = await _workloads(bench, settings, progress, restore_only)
        finally:
            await proxy.close()
    finally:
        server.stop()
    progress.step("done")
    results.seconds = progress.elapsed()
    results.loads = progress.loads
    return results


async def _workloads(
    bench: Bench, settings: Settings, progress: Progress, restore_only: bool
) -> Results:
    draws = random.Random(SEED)
    kills = []
    if restore_only:
        settings = dataclasses.replace(settings, kills=0, shutdowns=0)
    for trial in range(1, settings.kills + 1):
        after = round(draws.uniform(*settings.kill_window), 3)
        for tool in _order(trial):
            progress.step(f"SIGKILL {trial}/{settings.kills}: {tool.name} after {after:.2f} s")
            kills.append(await kill_trial(bench, tool, trial, after))
    shutdowns = []
    for trial in range(1, settings.shutdowns + 1):
        for tool in _order(trial):
            progress.step(f"SIGTERM {trial}/{settings.shutdowns}: {tool.name}")
            shutdowns.append(await shutdown_trial(bench, tool, trial))
    steady = []
    for replicator in () if restore_only else (*TOOLS, None):
        progress.step(f"steady cost: {replicator.name if replicator else 'no replicator'}")
        steady.append(await steady_run(bench, replicator, settings))
    builds, restores = [], []
    for tool in TOOLS:
        progress.step(f"restore: {tool.name}")
        build, done = await restore_runs(bench, tool, settings)
        builds.append(build)
        restores += done
    return Results(settings, kills, shutdowns, steady, builds, restores)


def _order(trial: int) -> tuple[Tool, ...]:
    """Alternate which tool goes first, so drift in the machine's load hits both alike."""
    return TOOLS if trial % 2 else TOOLS[::-1]


class Progress:
    """Says on stderr what runs now, and notes the machine's load average meanwhile."""

    def __init__(self) -> None:
        self._started = time.monotonic()
        self.loads: list[float] = []

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self._started

    def step(self, message: str) -> None:
        """Announce the next step."""
        load = os.getloadavg()[0]
        self.loads.append(load)
        print(f"[{self.elapsed():6.1f} s, load {load:.2f}] {message}", file=sys.stderr, flush=True)


# -- report ----------------------------------------------------------------------------------


def _ops(tally: Tally) -> str:
    ops = tally.operations
    return " ".join(f"{op} {ops[op]}" for op in OPERATIONS if ops[op]) or "none"


def _ratio(a: object, b: object) -> object:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return round(a / b, 2)
    return "-"


def summary_rows(results: Results) -> list[list[object]]:
    """Measure, replicad, Litestream, replicad / Litestream."""
    names = [t.name for t in TOOLS]
    rows: list[list[object]] = []

    def add(label: str, values: Sequence[object]) -> None:
        rows.append([label, *values, _ratio(values[0], values[1])])

    def per_tool(items: Sequence[object], tool: str) -> list[object]:
        return [i for i in items if getattr(i, "tool", None) == tool]

    kills = [per_tool(results.kills, n) for n in names]
    lost_s = [sorted(k.seconds_lost for k in ks) for ks in kills]  # type: ignore[attr-defined]
    lost_r = [sorted(k.rows_lost for k in ks) for ks in kills]  # type: ignore[attr-defined]
    add("SIGKILL: seconds lost, median", [round(statistics.median(v), 3) for v in lost_s])
    add("SIGKILL: seconds lost, max", [round(v[-1], 3) for v in lost_s])
    add("SIGKILL: rows lost, median", [statistics.median(v) for v in lost_r])
    add("SIGKILL: rows lost, max", [v[-1] for v in lost_r])
    terms = [per_tool(results.shutdowns, n) for n in names]
    add(
        "SIGTERM: rows lost (all runs)",
        [sum(t.committed - t.restored for t in ts) for ts in terms],  # type: ignore[attr-defined]
    )
    add("SIGTERM: exit statuses", [" ".join(str(t.status) for t in ts) for ts in terms])  # type: ignore[attr-defined]
    add(
        "SIGTERM: seconds to exit, max",
        [round(max(t.stop_seconds for t in ts), 2) for ts in terms],  # type: ignore[attr-defined]
    )
    steady = {s.tool: s for s in results.steady}
    st = [steady[n] for n in names]
    add("steady: writer's achieved txn/s", [round(_rate(s.commits)) for s in st])
    add("steady: CPU-s, writes", [round(s.writes_cpu, 2) for s in st])
    add("steady: CPU-s, idle", [round(s.idle_cpu, 2) for s in st])
    add(
        "steady: idle CPU-s per minute",
        [round(s.idle_cpu * 60 / max(s.idle_seconds, 1e-9), 3) for s in st],
    )
    add(
        "steady: peak RSS to end of writes (MB)",
        [round(s.writes_usage.peak_rss_bytes / 1e6, 1) for s in st],
    )
    add("steady: peak RSS (MB)", [round(s.total.peak_rss_bytes / 1e6, 1) for s in st])
    add("clean stop, nothing pending: seconds", [round(s.stop_seconds, 3) for s in st])
    add("steady: requests, writes", [s.writes.operations.total() for s in st])
    add("steady: requests, idle", [s.idle.operations.total() for s in st])
    add(
        "steady: uploaded MB, writes + idle",
        [round((s.writes.body_bytes + s.idle.body_bytes) / 1e6, 1) for s in st],
    )
    add("steady: peak WAL (MB)", [round(s.peak_wal_bytes / 1e6, 1) for s in st])
    add("steady: WAL after idle (MB)", [round(s.end_wal_bytes / 1e6, 1) for s in st])
    lat = [_latencies_ms(s.commits) for s in st]
    add("steady: COMMIT p50 (ms)", [round(percentile(v, 0.5), 2) for v in lat])
    add("steady: COMMIT p99 (ms)", [round(percentile(v, 0.99), 2) for v in lat])
    add("steady: COMMIT max (ms)", [round(v[-1], 1) for v in lat])
    if "none" in steady:
        alone = _latencies_ms(steady["none"].commits)
        for q, label in ((0.99, "p99"), (1.0, "max")):
            base = percentile(alone, q) if q < 1 else alone[-1]
            add(
                f"steady: COMMIT {label} / no replicator ({round(base, 2)} ms)",
                [round((percentile(v, q) if q < 1 else v[-1]) / base, 2) for v in lat],
            )
    restores = {(r.tool, r.target): r for r in results.restores}
    for target in ("latest", "middle, timestamp"):
        rs = [restores[(n, target)] for n in names]
        add(f"restore {target}: seconds", [round(r.restore.wall_seconds, 2) for r in rs])
        add(f"restore {target}: / raw download", [round(r.ratio, 2) for r in rs])
    rs = [restores[(n, "middle, timestamp")] for n in names]
    add("restore middle, timestamp: txns early", [r.wanted - r.restored for r in rs])
    add("restore middle, timestamp: ms early", [round(r.early_ms) for r in rs])
    return rows


def kill_rows(results: Results) -> list[list[object]]:
    """One row per SIGKILL."""
    return [
        [
            k.trial,
            k.tool,
            k.kill_after,
            k.last_committed,
            k.last_restored,
            k.rows_lost,
            round(k.seconds_lost, 3),
            round(k.restore.wall_seconds, 2),
        ]
        for k in sorted(results.kills, key=lambda k: (k.trial, k.tool))
    ]


def steady_rows(results: Results) -> list[list[object]]:
    """Each phase of each steady run."""
    rows: list[list[object]] = []
    for s in results.steady:
        lat = _latencies_ms(s.commits)
        rows.append(
            [
                s.tool,
                len(s.commits),
                round(_rate(s.commits)),
                round(percentile(lat, 0.5), 2),
                round(percentile(lat, 0.99), 2),
                round(lat[-1], 1),
                round(s.peak_wal_bytes / 1e6, 1),
                round(s.end_wal_bytes / 1e6, 1),
                round(s.startup_usage.cpu_seconds, 2) if s.tool != "none" else "-",
                round(s.total.peak_rss_bytes / 1e6, 1) if s.tool != "none" else "-",
            ]
        )
    return rows


def request_rows(results: Results) -> list[list[object]]:
    """Requests by operation in each phase of the steady runs."""
    rows: list[list[object]] = []
    for s in results.steady:
        if s.tool == "none":
            continue
        phases = (
            ("start-up", s.startup, "-"),
            ("writes + 2 s", s.writes, round(s.writes_cpu, 2)),
            ("idle", s.idle, round(s.idle_cpu, 2)),
            ("SIGTERM", s.shutdown, "-"),
        )
        for phase, tally, cpu in phases:
            rows.append(
                [
                    s.tool,
                    phase,
                    *(tally.operations[op] for op in OPERATIONS),
                    tally.operations.total(),
                    round(tally.body_bytes / 1e6, 2),
                    cpu,
                ]
            )
    return rows


def restore_rows(results: Results) -> list[list[object]]:
    """One row per timed restore."""
    return [
        [
            r.tool,
            r.target,
            r.raw.objects,
            round(r.raw.bytes / 1e6, 1),
            round(r.raw.seconds, 2),
            round(r.restore.wall_seconds, 2),
            round(r.ratio, 2),
            round(r.restore.cpu_seconds, 2),
            round(r.restore.peak_rss_bytes / 1e6, 1),
            r.restored,
            r.wanted - r.restored,
            round(r.early_ms),
        ]
        for r in results.restores
    ]


def build_rows(results: Results) -> list[list[object]]:
    """What replicating the restore workload's history cost each tool."""
    return [
        [
            b.tool,
            len(b.commits),
            round((b.commits[-1].time_ns - b.commits[0].start_ns) / 1e9, 1),
            round(b.db_bytes / 1e6, 1),
            b.replica.objects,
            round(b.replica.bytes / 1e6, 1),
            round(b.replica.seconds, 2),
            _ops(b.requests),
            round(b.requests.body_bytes / 1e6, 1),
            round(b.cpu_seconds, 2),
            round(b.peak_rss_bytes / 1e6, 1),
            b.status,
        ]
        for b in results.builds
    ]


def report(results: Results, versions: dict[str, str], command: str) -> None:
    """Print every table (only the restore tables after ``--restore-only``)."""
    s = results.settings
    print(machine())
    print(", ".join(f"{name} {v}" for name, v in versions.items()))
    print(f"command: {command}; ran {results.seconds:.0f} s")
    loads = results.loads
    print(f"1-minute load average at each step: {min(loads):.2f} to {max(loads):.2f}")
    print()
    if not results.steady:
        restore_report(results)
        return
    print("Summary")
    print_table(
        ("measure", *(t.name for t in TOOLS), "replicad / Litestream"), summary_rows(results)
    )
    print()
    print(f"1. SIGKILL during {KILL_RATE:g} txn/s of {ROW_BYTES}-byte rows ({s.kills} per tool)")
    print_table(
        (
            "trial",
            "tool",
            "killed after (s)",
            "last committed",
            "last restored",
            "rows lost",
            "seconds lost",
            "restore (s)",
        ),
        kill_rows(results),
    )
    print()
    print(f"2. SIGTERM right after the last of {SHUTDOWN_RATE * SHUTDOWN_SECONDS:g} commits")
    print_table(
        ("trial", "tool", "committed", "restored", "exit status", "seconds to exit"),
        [
            [t.trial, t.tool, t.committed, t.restored, t.status, round(t.stop_seconds, 2)]
            for t in sorted(results.shutdowns, key=lambda t: (t.trial, t.tool))
        ],
    )
    print()
    print(
        f"3/5. {STEADY_RATE:g} txn/s for {s.steady_seconds:g} s, then {s.idle_seconds:g} s idle: "
        "the writer, the WAL, the replicator"
    )
    print_table(
        (
            "replicator",
            "commits",
            "achieved txn/s",
            "COMMIT p50 (ms)",
            "p99",
            "max",
            "peak WAL (MB)",
            "WAL after idle (MB)",
            "start-up CPU-s",
            "peak RSS (MB)",
        ),
        steady_rows(results),
    )
    print()
    print("3. Requests at the proxy by phase (uploaded = request bodies)")
    print_table(
        ("tool", "phase", *OPERATIONS, "requests", "uploaded MB", "CPU-s"), request_rows(results)
    )
    print()
    restore_report(results)


def restore_report(results: Results) -> None:
    """Workload 4's tables."""
    s = results.settings
    print(
        f"4. Restore: history of {s.base_rows:,} x {HISTORY_BASE_BYTES // 1000} kB rows then "
        f"{s.tail_txns:,} small transactions at {HISTORY_TAIL_RATE:g} txn/s"
    )
    print_table(
        (
            "tool",
            "commits",
            "seconds",
            "database MB",
            "objects",
            "replica MB",
            "raw download all (s)",
            "requests while replicating",
            "uploaded MB",
            "CPU-s",
            "peak RSS (MB)",
            "exit status",
        ),
        build_rows(results),
    )
    print()
    print_table(
        (
            "tool",
            "target",
            "objects",
            "MB",
            "raw download (s)",
            "restore (s)",
            "restore / raw",
            "restore CPU-s",
            "restore peak RSS (MB)",
            "restored txn",
            "txns early",
            "ms early",
        ),
        restore_rows(results),
    )


def versions() -> dict[str, str]:
    """Both tools' versions, as they report them."""
    replicad = subprocess.run(
        [sys.executable, "-m", "replicad", "--version"],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
        cwd=ROOT,
    ).stdout.strip()
    return {
        "replicad": replicad.removeprefix("replicad ").strip(),
        "Litestream": litestream.version(),
    }


def _child(argv: Sequence[str]) -> None:
    """``history-init DB`` and ``history DB LOG BASE_ROWS TAIL_TXNS``: the restore workload's
    database and writer, in their own processes.
    """
    if argv[0] == "history-init":
        _history_schema(Path(argv[1]))
    else:
        _history_write(Path(argv[1]), Path(argv[2]), int(argv[3]), int(argv[4]))


def main(argv: Sequence[str] | None = None) -> None:
    """Run every workload against both tools and print the tables."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("history-init", "history"):
        _child(argv)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (< 3 min)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument(
        "--restore-only", action="store_true", help="only workload 4 (restore), both tools"
    )
    args = parser.parse_args(argv)
    found = versions()
    if found["Litestream"] != litestream.EXPECTED_VERSION:
        print(f"NOTE: Litestream {found['Litestream']}, written for {litestream.EXPECTED_VERSION}")
    root = Path(tempfile.mkdtemp(prefix="replicad-compare-"))
    try:
        settings = QUICK if args.quick else FULL
        results = asyncio.run(run_all(root, settings, restore_only=args.restore_only))
    finally:
        if args.keep:
            print(f"run directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    command = "python -m bench.compare " + " ".join(a for a in argv if a != "--keep")
    report(results, found, command.strip())


if __name__ == "__main__":
    main()
