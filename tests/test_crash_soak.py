r"""Crash-consistency soak: random crashes, checkpoints, readers and S3 faults, then restores.

Each run draws a scenario from its seed and plays it with real parts only: the daemon is a
`replicad replicate` child process, the application is the deterministic writer of
tests/workload.py (real sqlite3 connections, a commit log "k time_ns"), the storage is a real
S3 server on 127.0.0.1 (moto, with conditional writes and so fencing; or rclone serve s3,
without), reached through a `FaultProxy` in this process (5xx, dropped connections before and
after forwarding, latency, and one outage of 1-4 s).  Meanwhile: the daemon is SIGKILLed and
restarted 1-3 times at random moments, the writer is SIGKILLed and restarted (it continues at
`meta.seq + 1`, appending to its log), another process checkpoints in one mode (PASSIVE, FULL,
RESTART or TRUNCATE; sometimes also once, in any mode, while the daemon is down), and a long
reader holds a read transaction for a few seconds.

Checks (each failure is recorded with the run's seed; the run goes on to check the rest):

* At each daemon SIGKILL, before the restart, `replicad restore` of the newest state straight
  from the server (not through the proxy).  The daemon logs no event per segment upload (only
  "snapshot uploaded"), so the last upload it confirmed is read from its metrics
  (`replicad_replica_txid`, the last TXID the replica holds), scraped every 0.1 s and once more
  immediately before the kill: a lower bound on what it had confirmed.  The newest restorable
  TXID must be at least that one, and (checked at the end, with a restore at the confirmed TXID)
  every commit lost is one committed after the confirmed upload's last commit.
* After the run (SIGTERM: the daemon must flush and exit 0): restores of the newest state (equal
  to the live database), of every TXID confirmed or restored at a kill, of snapshots, of random
  TXIDs and of random moments (`--timestamp`).  Each passes `PRAGMA integrity_check` and equals
  `workload.replay` at the `meta.seq` it records; `seq` never falls as the TXID grows; a TXID
  restored at a kill restores to the same state at the end; a moment's restore holds no commit
  begun after that moment and at least every TXID the daemon reported uploaded before it.

`pytest tests/test_crash_soak.py -s` runs the quick variant (two short runs, one per server,
in the default test run); the slow one plays new runs until CRASH_SOAK_SECONDS (default 600)
have passed:

    CRASH_SOAK_SECONDS=1500 CRASH_SOAK_REPORT=/tmp/crash_soak.json \
        .venv/bin/python -m pytest -m slow tests/test_crash_soak.py -s

CRASH_SOAK_SEED=N replays a whole sequence of scenarios, CRASH_SOAK_RUN_SEED=N one run (each is
printed).  Timing is not replayed: the same scenario meets the faults at other moments.  A
failing run's files are kept (CRASH_SOAK_KEEP=1 keeps every run's: logs, restores).  The
report (runs, faults by kind, kills, checkpoints by mode, data lost at kills, failures with
their seeds) is printed as a table and written as JSON to CRASH_SOAK_REPORT if set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from replicad.position import ObjectKind, ObjectName, parse_key
from tests import workload
from tests.faultproxy import FaultProxy
from tests.procs import CHECKPOINTER, LONG_READER, ROOT, clean_env, free_port, replicad
from tests.procs import start_daemon as start_daemon_process
from tests.procs import start_writer as start_writer_process
from tests.s3servers import S3Server, child_env, create_bucket, raw_client, unique_bucket

pytestmark = pytest.mark.usefixtures("isolated_aws_environment")

#: How long the slow variant runs new scenarios, in seconds.
SOAK_SECONDS = float(os.environ.get("CRASH_SOAK_SECONDS", "600"))
#: Runs of the quick variant (one on moto, one on rclone serve s3).
QUICK_RUNS = 2
MODES = ("PASSIVE", "FULL", "RESTART", "TRUNCATE")
FAULT_KINDS = ("error", "drop", "drop_after_forward", "latency")
PREFIX = "soak/app"
SCRAPE_INTERVAL = 0.1
#: Restores run at once at the end of a run (the machine has two cores).
RESTORE_CONCURRENCY = 2
#: Writer transactions per start: more than any run commits (it is stopped with SIGKILL).
WRITER_COUNT = 10**7
#: Fatal messages in the daemon's log (anything else failing is retried by design).
FATAL_EVENTS = ("stopping after a fatal error",)
#: Daemon log events counted in the report, by the name they are counted under.
COUNTED_EVENTS = {
    "resumed from replica": "daemon_resumed",
    "snapshot taken": "snapshots_taken",
    "snapshot uploaded": "snapshots_uploaded",
    "continuity lost; taking a new snapshot": "continuity_losses",
    "upload failed; will retry": "upload_retries",
}


# -- the scenario ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """Everything random about one run, drawn from its seed (times in seconds from the start)."""

    seed: int
    server: str
    writer_seed: int
    rate: float
    app_autocheckpoint: int | None
    sync_interval: float
    checkpoint_pages: int
    truncate_pages: int
    #: Each daemon instance lives this long after it starts, then is SIGKILLed.
    daemon_lives: tuple[float, ...]
    #: After each kill (and the restore that checks it) the daemon stays down this much longer.
    daemon_downs: tuple[float, ...]
    #: A one-shot external checkpoint run while the daemon is down, or None.
    down_checkpoints: tuple[str | None, ...]
    writer_kills: tuple[float, ...]
    writer_down: float
    checkpointer_mode: str
    checkpointer_at: float
    checkpointer_interval: float
    checkpointer_busy_ms: int
    reader_at: float
    reader_seconds: float
    outage_at: float
    outage_seconds: float
    error_rate: float
    drop_rate: float
    drop_after_forward_rate: float
    latency_rate: float
    latency: float
    #: The writing phase lasts at least this long (longer if the daemon's kills take longer).
    duration: float
    random_txids: int
    random_moments: int

    @classmethod
    def draw(cls, seed: int, *, quick: bool) -> Scenario:
        """The scenario of run `seed`; the server follows the seed's parity (even: moto)."""
        rng = random.Random(seed)
        duration = rng.uniform(8, 12) if quick else rng.uniform(15, 35)
        kills = rng.randint(1, 3)
        longest_life = 3.5 if quick else 8.0
        writer_kills = 1 if quick else rng.randint(1, 2)
        return cls(
            seed=seed,
            server="moto" if seed % 2 == 0 else "rclone",
            writer_seed=rng.randint(1, 10**6),
            rate=rng.uniform(80, 200) if quick else rng.uniform(50, 300),
            app_autocheckpoint=rng.choice([None, 0, 200]),
            sync_interval=rng.choice([0.05, 0.1, 0.2, 0.5, 1.0]),
            checkpoint_pages=rng.choice([0, 200, 1000]),
            truncate_pages=rng.choice([2000, 10000]),
            daemon_lives=tuple(round(rng.uniform(0.3, longest_life), 2) for _ in range(kills)),
            daemon_downs=tuple(round(rng.uniform(0, 1 if quick else 3), 2) for _ in range(kills)),
            down_checkpoints=tuple(rng.choice([None, None, *MODES]) for _ in range(kills)),
            writer_kills=tuple(
                sorted(round(rng.uniform(0.5, duration - 0.5), 2) for _ in range(writer_kills))
            ),
            writer_down=round(rng.uniform(0, 1.5), 2),
            checkpointer_mode=rng.choice(MODES),
            checkpointer_at=round(rng.uniform(0, duration / 2), 2),
            checkpointer_interval=rng.choice([0.1, 0.3, 1.0, 2.0]),
            checkpointer_busy_ms=rng.choice([100, 1000, 3000]),
            reader_at=round(rng.uniform(0, duration - 2), 2),
            reader_seconds=round(rng.uniform(1, 5), 2),
            outage_at=round(rng.uniform(0.5, duration - 0.5), 2),
            outage_seconds=round(rng.uniform(1, 4), 2),
            error_rate=round(rng.uniform(0, 0.15), 3),
            drop_rate=round(rng.uniform(0, 0.08), 3),
            drop_after_forward_rate=round(rng.uniform(0, 0.08), 3),
            latency_rate=round(rng.uniform(0, 0.3), 3),
            latency=round(rng.uniform(0.01, 0.4), 3),
            duration=round(duration, 2),
            random_txids=3 if quick else 5,
            random_moments=2 if quick else 4,
        )

    def brief(self) -> str:
        """One line for the progress output."""
        kills = ",".join(
            f"{life}+{down}"
            for life, down in zip(self.daemon_lives, self.daemon_downs, strict=True)
        )
        return (
            f"{self.server} {self.duration}s {self.rate:.0f}txn/s sync {self.sync_interval}s "
            f"kills[{kills}] "
            f"ckpt {self.checkpointer_mode}/{self.checkpointer_interval}s "
            f"down-ckpt {[m for m in self.down_checkpoints if m]} "
            f"faults e{self.error_rate} d{self.drop_rate} a{self.drop_after_forward_rate} "
            f"l{self.latency_rate}x{self.latency}s outage {self.outage_seconds}s@{self.outage_at}"
        )


def replicad_sources() -> str:
    """A digest of replicad's sources: which code a report is about (it is being worked on)."""
    sha = hashlib.sha256()
    for path in sorted((ROOT / "replicad").rglob("*.py")):
        sha.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return sha.hexdigest()[:16]


def _stderr_summary(stderr: str) -> str:
    """The last lines of a command's error output (the error, or a traceback's end) in one line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-600:]


# -- the report ------------------------------------------------------------------------------


@dataclass
class Report:
    """What all runs of one test did and found."""

    variant: str
    master_seed: int
    #: The pytest command line of this variant (replay with CRASH_SOAK_SEED or _RUN_SEED).
    command: str
    started: float = field(default_factory=time.monotonic)
    #: `replicad_sources()` when the test began.
    sources: str = field(default_factory=replicad_sources)
    runs: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    events: Counter[str] = field(default_factory=Counter)
    checkpoints: dict[str, Counter[str]] = field(default_factory=dict)
    restores: Counter[str] = field(default_factory=Counter)
    #: Per daemon kill: commits lost (committed before the kill, not restorable right after it).
    lost_commits: list[int] = field(default_factory=list)
    #: Per daemon kill: how long before the kill the oldest lost commit was committed.
    lost_seconds: list[float] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    run_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def replay_command(self) -> str:
        return f"CRASH_SOAK_SEED={self.master_seed} {self.command}"

    def add_checkpoints(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            counter = self.checkpoints.setdefault(str(record["mode"]), Counter())
            counter["run"] += 1
            counter["busy"] += bool(record["busy"])

    def as_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "master_seed": self.master_seed,
            "replay": self.replay_command,
            "seconds": round(time.monotonic() - self.started, 1),
            "replicad_sources": {"at_start": self.sources, "at_end": replicad_sources()},
            "runs": self.runs,
            "failed_runs": len(self.failures),
            "faults_injected": {kind: self.faults[kind] for kind in FAULT_KINDS},
            "requests_through_proxy": self.requests,
            "events": dict(sorted(self.events.items())),
            "external_checkpoints": {m: dict(c) for m, c in sorted(self.checkpoints.items())},
            "restores": dict(sorted(self.restores.items())),
            "data_lost_at_kills": {
                "kills_checked": len(self.lost_commits),
                "lost_commits_total": sum(self.lost_commits),
                "lost_commits_max": max(self.lost_commits, default=0),
                "oldest_lost_seconds_before_kill_max": round(max(self.lost_seconds, default=0), 3),
            },
            "failures": self.failures,
            "run_details": self.run_rows,
        }

    def table(self) -> str:
        data = self.as_json()
        lost = data["data_lost_at_kills"]
        ckpts = "  ".join(
            f"{mode} {c.get('run', 0)} (busy {c.get('busy', 0)})"
            for mode, c in data["external_checkpoints"].items()
        )
        rows = [
            ("variant / seed", f"{self.variant}, CRASH_SOAK_SEED={self.master_seed}"),
            ("runs (failed)", f"{self.runs} ({len(self.failures)}) in {data['seconds']} s"),
            (
                "faults injected",
                "  ".join(f"{k} {v}" for k, v in data["faults_injected"].items())
                + f"  (of {self.requests} requests)",
            ),
            (
                "outages",
                f"{self.events['outages']} ({self.events['outage_ms'] / 1000:.1f} s in all)",
            ),
            ("daemon SIGKILLs", str(self.events["daemon_kills"])),
            ("writer SIGKILLs", str(self.events["writer_kills"])),
            ("long readers", str(self.events["long_reads"])),
            ("ext. checkpoints", ckpts or "-"),
            ("restores", "  ".join(f"{k} {v}" for k, v in data["restores"].items()) or "-"),
            (
                "lost at kills",
                f"{lost['kills_checked']} kills: {lost['lost_commits_total']} commits in all, "
                f"max {lost['lost_commits_max']}, oldest "
                f"{lost['oldest_lost_seconds_before_kill_max']} s before its kill",
            ),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"crash soak report ({self.replay_command})"]
        lines += [f"  {k.ljust(width)} | {v}" for k, v in rows]
        sources = data["replicad_sources"]
        if sources["at_start"] != sources["at_end"]:
            lines.append(
                f"  WARNING: replicad/ sources changed during the test ({sources['at_start']} -> "
                f"{sources['at_end']}): failures may come from files being edited"
            )
        for failure in self.failures:
            lines.append(
                f"  FAILED run {failure['run']} seed {failure['seed']}: {failure['replay']}"
            )
            lines += [f"    - {(p.splitlines() or [''])[0][:300]}" for p in failure["problems"]]
        return "\n".join(lines)

    def publish(self) -> None:
        """Print the table and write the JSON report if CRASH_SOAK_REPORT is set."""
        print("\n" + self.table())
        target = os.environ.get("CRASH_SOAK_REPORT")
        if target:
            Path(target).write_text(json.dumps(self.as_json(), indent=2) + "\n")
            print(f"report written to {target}")


# -- one run ---------------------------------------------------------------------------------


@dataclass
class KillCheck:
    """One daemon SIGKILL and what the replica held right after it."""

    index: int
    kill_ns: int
    #: The last TXID the daemon reported uploaded (metrics) before the kill; 0 if none.
    confirmed_txid: int
    #: The newest TXID restored right after the kill (None: the restore failed).
    restored_txid: int | None
    restored: Path
    #: Commits the writer had logged by the kill.
    logged: list[tuple[int, int]]


@dataclass
class Restored:
    """One restore done after the run."""

    label: str
    txid: int
    path: Path
    k: int = -1
    digest: str = ""
    #: The moment asked for (`--timestamp`), if any.
    at_ns: int | None = None


class SoakRun:
    """The processes, proxy and checks of one scenario."""

    def __init__(self, scenario: Scenario, server: S3Server, tmp: Path, proxy: FaultProxy) -> None:
        self.sc = scenario
        self.server = server
        self.tmp = tmp
        tmp.mkdir(parents=True)
        self.proxy = proxy
        self.bucket = unique_bucket()
        self.env = child_env(server, tmp)
        self.db = tmp / "app.db"
        self.wlog = tmp / "writer.log"
        self.dlog = tmp / "daemon.log"
        self.ckpt_log = tmp / "checkpoints.jsonl"
        self.problems: list[str] = []
        self.events: Counter[str] = Counter()
        self.procs: list[subprocess.Popen[Any]] = []
        self.daemon: subprocess.Popen[bytes] | None = None
        self.writer: subprocess.Popen[bytes] | None = None
        self.checkpointer: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        #: Whether the current daemon has answered a scrape (its signal handlers are set).
        self.daemon_answered = False
        #: (time the scrape answered, TXID) each time the confirmed TXID grew.
        self.confirmations: list[tuple[int, int]] = []
        self.kills: list[KillCheck] = []
        self.restores: Counter[str] = Counter()
        self.lost: list[tuple[int, float]] = []
        self.start_ns = 0
        self.end_ns = 0

    # -- helpers ------------------------------------------------------------------------------

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"    problem: {text.splitlines()[0][:300]}")

    @property
    def confirmed(self) -> int:
        return self.confirmations[-1][1] if self.confirmations else 0

    def url(self, endpoint: str) -> str:
        return f"s3://{self.bucket}/{PREFIX}?endpoint={endpoint}&path_style=true&region=us-east-1"

    def log_tail(self, lines: int = 25) -> str:
        if not self.dlog.exists():
            return "(no daemon log)"
        return "\n".join(self.dlog.read_text(errors="replace").splitlines()[-lines:])

    def write_config(self) -> None:
        sc = self.sc
        (self.tmp / "replicad.toml").write_text(
            "log_level = 'info'\nshutdown_timeout = 90\n"
            f"[[databases]]\npath = '{self.db}'\nsync_interval = {sc.sync_interval}\n"
            f"checkpoint_pages = {sc.checkpoint_pages}\ntruncate_pages = {sc.truncate_pages}\n"
            f"[[databases.replicas]]\nurl = '{self.url(self.proxy.url)}'\n"
        )

    def start_daemon(self) -> None:
        self.metrics_port = free_port()
        self.daemon_answered = False
        args = ["-c", str(self.tmp / "replicad.toml"), "--metrics-addr"]
        self.daemon = start_daemon_process(
            [*args, f"127.0.0.1:{self.metrics_port}"], self.dlog, env=self.env
        )
        self.procs.append(self.daemon)
        self.events["daemon_starts"] += 1

    def start_writer(self) -> None:
        self.writer = start_writer_process(
            self.db,
            self.wlog,
            seed=self.sc.writer_seed,
            count=WRITER_COUNT,
            rate=self.sc.rate,
            autocheckpoint=self.sc.app_autocheckpoint,
            stderr=self.tmp / "writer.err",
        )
        self.procs.append(self.writer)

    def start_checkpointer(
        self, mode: str, interval: float, busy_ms: int
    ) -> subprocess.Popen[bytes]:
        args = [self.db, mode, interval, busy_ms, self.ckpt_log]
        proc = subprocess.Popen(
            [sys.executable, "-c", CHECKPOINTER, *map(str, args)], env=clean_env(), cwd=ROOT
        )
        self.procs.append(proc)
        return proc

    async def restore(self, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        """`replicad restore` straight from the server (not through the proxy)."""
        args = ["restore", "-o", str(out), *extra, self.url(self.server.endpoint_url)]
        return await asyncio.to_thread(replicad, *args, env=self.env, timeout=300)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    # -- the daemon's confirmations ---------------------------------------------------------

    async def scrape(self) -> int | None:
        """`replicad_replica_txid` from the current daemon's /metrics, None if unreachable."""
        port = self.metrics_port
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
        except (OSError, TimeoutError):
            return None
        try:
            writer.write(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 2.0)
        except (OSError, TimeoutError):
            return None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        answered_ns = time.time_ns()
        if port == self.metrics_port:
            self.daemon_answered = True
        head, _, body = raw.partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
            return None
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("replicad_replica_txid{"):
                txid = int(float(line.rsplit(" ", 1)[1]))
                if txid > self.confirmed:
                    self.confirmations.append((answered_ns, txid))
                return txid
        return None

    async def scrape_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.daemon is not None and self.daemon.poll() is None:
                await self.scrape()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SCRAPE_INTERVAL)

    # -- timelines ----------------------------------------------------------------------------

    async def daemon_timeline(self) -> None:
        sc = self.sc
        for index, life in enumerate(sc.daemon_lives):
            await asyncio.sleep(life)
            await self.kill_daemon(index)
            mode = sc.down_checkpoints[index]
            if mode is not None:
                once = self.start_checkpointer(mode, 0, 2000)
                await asyncio.to_thread(once.wait, 60)
                self.events[f"down_checkpoint_{mode}"] += 1
            await asyncio.sleep(sc.daemon_downs[index])
            self.start_daemon()

    async def kill_daemon(self, index: int) -> None:
        """SIGKILL the daemon, then restore the newest state and check it against the
        confirmed uploads (the comparison with the writer's states is done at the end).
        """
        daemon = self.daemon
        assert daemon is not None
        if daemon.poll() is not None:
            self.problem(
                f"daemon exited by itself (status {daemon.returncode}) before kill {index}:\n"
                + self.log_tail()
            )
        await self.scrape()  # the freshest confirmation: a lower bound on what it confirmed
        confirmed = self.confirmed
        daemon.send_signal(signal.SIGKILL)
        kill_ns = time.time_ns()
        await asyncio.to_thread(daemon.wait, 30)
        self.events["daemon_kills"] += 1
        logged = read_complete_log(self.wlog)
        out = self.tmp / f"at-kill-{index}.db"
        result = await self.restore(out)
        self.restores["at_kill"] += 1
        restored: int | None = None
        if result.returncode == 0:
            restored = int(json.loads(result.stdout.splitlines()[-1])["txid"])
            if restored < confirmed:
                self.problem(
                    f"kill {index}: the newest restorable TXID {restored} is below the TXID "
                    f"{confirmed} the daemon had reported uploaded before the kill"
                )
        elif confirmed > 0:
            self.problem(
                f"kill {index}: restore of the newest state failed although TXID {confirmed} "
                f"was confirmed uploaded: {_stderr_summary(result.stderr)}"
            )
        self.kills.append(KillCheck(index, kill_ns, confirmed, restored, out, logged))

    async def writer_timeline(self) -> None:
        elapsed = 0.0
        for at in self.sc.writer_kills:
            await asyncio.sleep(at - elapsed)
            writer = self.writer
            assert writer is not None
            if writer.poll() is not None:
                self.problem(f"writer exited by itself ({writer.returncode}): {self.writer_err()}")
            else:
                writer.send_signal(signal.SIGKILL)
                await asyncio.to_thread(writer.wait, 30)
                self.events["writer_kills"] += 1
            await asyncio.sleep(self.sc.writer_down)
            self.start_writer()
            elapsed = at + self.sc.writer_down

    def writer_err(self) -> str:
        path = self.tmp / "writer.err"
        return path.read_text(errors="replace")[-1500:] if path.exists() else ""

    async def checkpointer_timeline(self) -> None:
        await asyncio.sleep(self.sc.checkpointer_at)
        self.checkpointer = self.start_checkpointer(
            self.sc.checkpointer_mode, self.sc.checkpointer_interval, self.sc.checkpointer_busy_ms
        )

    async def reader_timeline(self) -> None:
        await asyncio.sleep(self.sc.reader_at)
        reader = self.start_reader()
        assert reader.stdout is not None
        line = await asyncio.to_thread(reader.stdout.readline)
        status = await asyncio.to_thread(reader.wait, self.sc.reader_seconds + 60)
        if line.strip() != "reading" or status != 0:
            self.problem(f"the long reader failed (status {status}, said {line!r})")
        self.events["long_reads"] += 1

    def start_reader(self) -> subprocess.Popen[str]:
        reader = subprocess.Popen(
            [sys.executable, "-c", LONG_READER, str(self.db), str(self.sc.reader_seconds)],
            stdout=subprocess.PIPE,
            text=True,
            env=clean_env(),
            cwd=ROOT,
        )
        self.procs.append(reader)
        return reader

    async def outage_timeline(self) -> None:
        await asyncio.sleep(self.sc.outage_at)
        self.proxy.pause()
        self.events["outages"] += 1
        await asyncio.sleep(self.sc.outage_seconds)
        await self.proxy.resume()
        self.events["outage_ms"] += round(self.sc.outage_seconds * 1000)

    # -- the run ------------------------------------------------------------------------------

    async def execute(self) -> None:
        await create_bucket(self.server, self.bucket)
        conn = sqlite3.connect(self.db)
        workload.setup(conn)
        conn.close()
        self.write_config()
        self.start_daemon()
        stop_scraping = asyncio.Event()
        scraper = asyncio.create_task(self.scrape_loop(stop_scraping))
        try:
            deadline = time.monotonic() + 90
            while self.confirmed == 0:
                assert self.daemon is not None
                if self.daemon.poll() is not None or time.monotonic() > deadline:
                    self.problem(
                        "the first snapshot never reached the replica:\n" + self.log_tail()
                    )
                    return
                await asyncio.sleep(0.05)
            self.start_ns = time.time_ns()
            self.start_writer()
            async with asyncio.TaskGroup() as group:
                group.create_task(self.daemon_timeline())
                group.create_task(self.writer_timeline())
                group.create_task(self.checkpointer_timeline())
                group.create_task(self.reader_timeline())
                group.create_task(self.outage_timeline())
                group.create_task(asyncio.sleep(self.sc.duration))
            await self.finish_writing()
        finally:
            stop_scraping.set()
            await scraper
        await self.final_checks()

    async def finish_writing(self) -> None:
        """Stop the writer (SIGKILL: it has no other way to stop) and the checkpointer, then the
        daemon with SIGTERM: it must ship everything and exit 0.
        """
        writer = self.writer
        assert writer is not None
        if writer.poll() is not None:
            self.problem(f"writer exited by itself ({writer.returncode}): {self.writer_err()}")
        writer.kill()
        await asyncio.to_thread(writer.wait, 30)
        if self.checkpointer is not None:
            self.checkpointer.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.checkpointer.wait, 60)
        self.end_ns = time.time_ns()
        daemon = self.daemon
        assert daemon is not None
        if daemon.poll() is not None:
            self.problem(
                f"daemon exited by itself (status {daemon.returncode}) before the final stop:\n"
                + self.log_tail()
            )
            return
        # A daemon restarted just now may still be importing Python, before it can handle
        # SIGTERM: wait until it answers on its metrics port (set up after its handlers).
        deadline = time.monotonic() + 60
        while not self.daemon_answered and daemon.poll() is None:
            if time.monotonic() > deadline:
                self.problem("the restarted daemon never served metrics:\n" + self.log_tail())
                break
            await asyncio.sleep(0.05)
        daemon.send_signal(signal.SIGTERM)
        try:
            status = await asyncio.to_thread(daemon.wait, 120)
        except subprocess.TimeoutExpired:
            daemon.kill()
            self.problem("daemon did not stop within 120 s of SIGTERM:\n" + self.log_tail())
            return
        if status != 0:
            self.problem(
                f"daemon exited {status} after SIGTERM (flush failed?):\n{self.log_tail()}"
            )

    # -- checks after the run ---------------------------------------------------------------

    async def list_names(self) -> list[ObjectName]:
        names = []
        async with raw_client(self.server) as s3:
            paginator = s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=PREFIX + "/"):
                for obj in page.get("Contents", []):
                    name = parse_key(obj["Key"][len(PREFIX) + 1 :])
                    if name is not None:
                        names.append(name)
        return names

    async def delete_bucket_contents(self) -> None:
        async with raw_client(self.server) as s3:
            paginator = s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    await s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    def check_daemon_log(self) -> None:
        """No traceback and no fatal error; counts how the daemon started and lost continuity."""
        if not self.dlog.exists():
            return
        text = self.dlog.read_text(errors="replace")
        if "Traceback (most recent call last)" in text:
            start = text.index("Traceback (most recent call last)")
            self.problem("the daemon printed a traceback:\n" + text[start : start + 3000])
        for line in text.splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if not isinstance(record, dict):
                    continue
                event = record.get("event")
                if event in FATAL_EVENTS:
                    self.problem(f"daemon log: {line}")
                elif event in COUNTED_EVENTS:
                    self.events[COUNTED_EVENTS[event]] += 1

    async def final_checks(self) -> None:
        self.check_daemon_log()
        if not self.start_ns:
            return
        names = await self.list_names()
        if not any(n.kind is ObjectKind.SNAPSHOT for n in names):
            self.problem("the replica holds no snapshot")
            return
        newest = max(n.last_txid for n in names)
        wanted = self.plan_restores(names)
        gate = asyncio.Semaphore(RESTORE_CONCURRENCY)
        done = await asyncio.gather(
            *(
                self.restore_one(i, label, txid, at, gate)
                for i, (label, txid, at) in enumerate(wanted)
            )
        )
        restored = [r for r in done if r is not None]
        for kill in self.kills:
            if kill.restored_txid is not None:
                at_kill = Restored(f"at-kill-{kill.index}", kill.restored_txid, kill.restored)
                if await asyncio.to_thread(self.inspect, at_kill):
                    restored.append(at_kill)
        await asyncio.to_thread(self.compare, restored, newest)

    def plan_restores(self, names: list[ObjectName]) -> list[tuple[str, int | None, int | None]]:
        """(label, TXID, moment) of each restore to make: the newest state, what each kill
        confirmed and restored (and the TXID after it), a moment just before each kill,
        snapshots, random TXIDs and random moments.
        """
        snapshots = sorted({n.last_txid for n in names if n.kind is ObjectKind.SNAPSHOT})
        newest = max(n.last_txid for n in names)
        rng = random.Random(self.sc.seed * 7919 + 1)
        wanted: list[tuple[str, int | None, int | None]] = [("latest", None, None)]
        for kill in self.kills:
            if kill.restored_txid is not None:
                wanted.append((f"kill-{kill.index}-again", kill.restored_txid, None))
                if kill.restored_txid < newest:  # the first TXID after the crash
                    wanted.append((f"after-kill-{kill.index}", kill.restored_txid + 1, None))
            if kill.confirmed_txid:
                wanted.append((f"confirmed-{kill.index}", kill.confirmed_txid, None))
            moment = kill.kill_ns - rng.randint(0, 300_000_000)
            wanted.append((f"before-kill-{kill.index}", None, moment))
        wanted += [("snapshot", t, None) for t in rng.sample(snapshots, min(3, len(snapshots)))]
        wanted += [
            ("random-txid", rng.randint(snapshots[0], newest), None)
            for _ in range(self.sc.random_txids)
        ]
        wanted += [
            ("random-moment", None, rng.randint(self.start_ns, self.end_ns))
            for _ in range(self.sc.random_moments)
        ]
        return wanted

    async def restore_one(
        self, i: int, label: str, txid: int | None, at_ns: int | None, gate: asyncio.Semaphore
    ) -> Restored | None:
        out = self.tmp / f"restore-{i}-{label}.db"
        extra: list[str] = []
        if txid is not None:
            extra = ["--txid", str(txid)]
        elif at_ns is not None:
            at_ns -= at_ns % 1000  # what --timestamp can say (microseconds)
            extra = ["--timestamp", _rfc3339(at_ns)]
        async with gate:
            result = await self.restore(out, *extra)
        kind = "latest" if label == "latest" else "timestamp" if at_ns is not None else "txid"
        self.restores[kind] += 1
        if result.returncode != 0:
            out.with_name(out.name + ".stderr").write_text(result.stderr)
            self.problem(
                f"restore {label} {extra} failed ({result.returncode}): "
                + _stderr_summary(result.stderr)
            )
            return None
        got = int(json.loads(result.stdout.splitlines()[-1])["txid"])
        if txid is not None and got != txid:
            self.problem(f"restore {label} --txid {txid} restored TXID {got}")
        entry = Restored(label, got, out, at_ns=at_ns)
        return entry if await asyncio.to_thread(self.inspect, entry) else None

    def inspect(self, entry: Restored) -> bool:
        """integrity_check, the `meta.seq` it records and its content digest."""
        check = workload.integrity(entry.path)
        if check != "ok":
            self.problem(f"restore {entry.label} (TXID {entry.txid}): integrity_check: {check}")
            return False
        entry.k = workload.seq_of(entry.path)
        entry.digest = workload.digest(entry.path)
        return True

    def compare(self, restored: list[Restored], newest: int) -> None:
        """Every restore against the writer's committed states, and the bounds."""
        logged = read_complete_log(self.wlog)
        live_k = workload.seq_of(self.db)
        live = workload.digest(self.db)
        by_label = {r.label: r for r in restored}
        latest = by_label.get("latest")
        if latest is not None:
            if latest.txid != newest:
                self.problem(f"latest restore is TXID {latest.txid}, the replica's newest {newest}")
            if latest.digest != live:
                self.problem(
                    f"latest restore (TXID {latest.txid}, k {latest.k}) differs from the live "
                    f"database (k {live_k}) after a clean stop"
                )
        if logged and live_k < logged[-1][0]:
            self.problem(f"the live database is at k {live_k}, the writer logged {logged[-1][0]}")
        self.check_replay(restored, live_k, live)
        self.check_order(restored)
        self.check_moments(restored, logged)
        for kill in self.kills:
            self.check_loss(kill, by_label)

    def check_replay(self, restored: list[Restored], live_k: int, live: str) -> None:
        """Each restore is the writer's state after the commit k it records."""
        ks = {r.k for r in restored} | {live_k}
        replay_db = self.tmp / "replay.db"
        expected = workload.replays(self.sc.writer_seed, ks, replay_db, workload.digest)
        if expected[live_k] != live:
            self.problem(f"harness: the live database differs from replay({live_k})")
        for r in restored:
            if expected[r.k] != r.digest:
                self.problem(
                    f"restore {r.label} (TXID {r.txid}) records k {r.k} but differs from the "
                    f"writer's state after commit {r.k}; kept at {r.path}"
                )

    def check_order(self, restored: list[Restored]) -> None:
        """seq never falls as the TXID grows; one TXID is always one state."""
        ordered = sorted(restored, key=lambda r: (r.txid, r.k))
        for a, b in itertools.pairwise(ordered):
            if b.k < a.k or (a.txid == b.txid and a.digest != b.digest):
                self.problem(
                    f"TXID {a.txid} ({a.label}) restored k {a.k} but TXID {b.txid} ({b.label}) "
                    f"restored k {b.k}" + (" (another state)" if a.txid == b.txid else "")
                )

    def check_moments(self, restored: list[Restored], logged: list[tuple[int, int]]) -> None:
        """A moment's restore holds no commit begun after the moment (commit k begins after
        commit k-1 was logged) and every TXID the daemon reported uploaded before it.
        """
        for r in restored:
            if r.at_ns is None:
                continue
            before = [(k, t) for k, t in logged if k < r.k]
            if before and before[-1][1] > r.at_ns:
                self.problem(
                    f"restore at {_rfc3339(r.at_ns)} holds commit {r.k}, begun after commit "
                    f"{before[-1][0]} was logged at {_rfc3339(before[-1][1])}"
                )
            reported = [txid for answered, txid in self.confirmations if answered <= r.at_ns]
            if reported and r.txid < max(reported):
                self.problem(
                    f"restore at {_rfc3339(r.at_ns)} gave TXID {r.txid}, but TXID "
                    f"{max(reported)} had been reported uploaded before that moment"
                )

    def check_loss(self, kill: KillCheck, by_label: dict[str, Restored]) -> None:
        """Commits lost by the kill are all committed after the last confirmed upload."""
        at_kill = by_label.get(f"at-kill-{kill.index}")
        confirmed_k = 0
        if kill.confirmed_txid:
            confirmed = by_label.get(f"confirmed-{kill.index}")
            if confirmed is None:
                return  # its restore failed, already reported
            confirmed_k = confirmed.k
        kept_k = at_kill.k if at_kill is not None else 0
        if kept_k < confirmed_k:
            self.problem(
                f"kill {kill.index}: right after the kill the replica held k {kept_k}, below "
                f"k {confirmed_k} of TXID {kill.confirmed_txid} confirmed uploaded before it"
            )
        lost = [(k, t) for k, t in kill.logged if k > kept_k and t <= kill.kill_ns]
        oldest = (kill.kill_ns - min(t for _, t in lost)) / 1e9 if lost else 0.0
        self.lost.append((len(lost), oldest))


def read_complete_log(path: Path) -> list[tuple[int, int]]:
    """The writer's log like `workload.read_log`, without a line it is still writing."""
    if not path.exists():
        return []
    complete = path.read_text().split("\n")[:-1]
    return [(int(k), int(t)) for k, t in (line.split() for line in complete if line)]


def _rfc3339(ns: int) -> str:
    """Unix nanoseconds as RFC 3339 UTC with microseconds (truncated, so never later)."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


# -- driving runs ----------------------------------------------------------------------------


async def soak_run(
    index: int, scenario: Scenario, server: S3Server, tmp: Path, report: Report
) -> bool:
    """Play one scenario, fold it into `report`; whether it passed."""
    print(f"run {index} seed {scenario.seed}: {scenario.brief()}", flush=True)
    started = time.monotonic()
    proxy = FaultProxy(
        server.endpoint_url,
        error_rate=scenario.error_rate,
        drop_rate=scenario.drop_rate,
        drop_after_forward_rate=scenario.drop_after_forward_rate,
        latency_rate=scenario.latency_rate,
        latency=scenario.latency,
        seed=scenario.seed,
    )
    run = SoakRun(scenario, server, tmp, proxy)
    async with proxy:
        try:
            await run.execute()
        except Exception:
            run.problem("harness error:\n" + traceback.format_exc(limit=6))
        finally:
            run.kill_all()
    if run.ckpt_log.exists():
        report.add_checkpoints(
            [json.loads(line) for line in run.ckpt_log.read_text().splitlines() if line]
        )
    report.runs += 1
    report.faults.update(proxy.injected)
    report.requests += proxy.total_requests
    report.events.update(run.events)
    report.restores.update(run.restores)
    report.lost_commits += [n for n, _ in run.lost]
    report.lost_seconds += [s for _, s in run.lost]
    seconds = round(time.monotonic() - started, 1)
    row = {
        "run": index,
        "seed": scenario.seed,
        "ok": not run.problems,
        "seconds": seconds,
        "scenario": asdict(scenario),
        "faults": dict(proxy.injected),
        "events": dict(run.events),
        "lost_at_kills": run.lost,
        "dir": str(tmp),
    }
    report.run_rows.append(row)
    if run.problems:
        report.failures.append(
            {
                "run": index,
                "seed": scenario.seed,
                "replay": f"CRASH_SOAK_RUN_SEED={scenario.seed} {report.command}",
                "problems": run.problems,
                "dir": str(tmp),
            }
        )
    print(
        f"run {index} seed {scenario.seed}: {'ok' if not run.problems else 'FAILED'} in {seconds}s"
        f" faults {dict(proxy.injected)} kills {run.events['daemon_kills']} lost {run.lost}",
        flush=True,
    )
    if not run.problems and not os.environ.get("CRASH_SOAK_KEEP"):
        with contextlib.suppress(Exception):
            await run.delete_bucket_contents()
        shutil.rmtree(tmp, ignore_errors=True)
    return not run.problems


def _master_seed() -> int:
    return int(os.environ.get("CRASH_SOAK_SEED", time.time_ns() % 2**32))


def _single_run_seed() -> int | None:
    value = os.environ.get("CRASH_SOAK_RUN_SEED")
    return int(value) if value else None


def _failed(report: Report) -> str:
    return "\n".join(
        f"run {f['run']} seed {f['seed']} ({f['replay']}, files in {f['dir']}):\n  "
        + "\n  ".join(f["problems"])
        for f in report.failures
    )


async def test_crash_soak_quick(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Two short runs (one on moto, one on rclone serve s3) with every kind of event."""
    master = _master_seed()
    report = Report(
        "quick", master, ".venv/bin/python -m pytest tests/test_crash_soak.py -s -k quick"
    )
    rng = random.Random(master)
    single = _single_run_seed()
    seeds = [single] if single is not None else [rng.getrandbits(32) & ~1, rng.getrandbits(32) | 1]
    for index, seed in enumerate(seeds[:QUICK_RUNS]):
        scenario = Scenario.draw(seed, quick=True)
        server: S3Server = request.getfixturevalue(f"{scenario.server}_server")
        await soak_run(index, scenario, server, tmp_path / f"run-{index}", report)
    report.publish()
    assert not report.failures, _failed(report)


@pytest.mark.slow
@pytest.mark.timeout(int(SOAK_SECONDS) + 1200)
async def test_crash_soak_slow(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """New random runs until CRASH_SOAK_SECONDS have passed; every failing seed is listed."""
    master = _master_seed()
    report = Report(
        "slow", master, ".venv/bin/python -m pytest -m slow tests/test_crash_soak.py -s"
    )
    rng = random.Random(master)
    single = _single_run_seed()
    deadline = time.monotonic() + SOAK_SECONDS
    index = 0
    while index == 0 or (single is None and time.monotonic() < deadline):
        seed = single if single is not None else rng.getrandbits(32)
        scenario = Scenario.draw(seed, quick=False)
        server: S3Server = request.getfixturevalue(f"{scenario.server}_server")
        await soak_run(index, scenario, server, tmp_path / f"run-{index}", report)
        index += 1
    report.publish()
    assert not report.failures, _failed(report)
