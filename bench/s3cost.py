"""What replication costs in S3 requests and bytes: ``python -m bench.s3cost`` from the repo root.

    python -m bench.s3cost [--quick] [--keep]

`rclone serve s3` on 127.0.0.1 with a counting proxy in front of it (`tests.faultproxy` with
no faults, extended here to classify each request as an S3 operation and count its body
bytes); the daemon's replica URL points at the proxy, so every request it makes is seen.
The daemon runs with ``--metrics-addr``, whose counters cross-check the proxy's.

Run 1, one database at 100 txn/s (`bench.common`'s writer, one 1024-byte random row per
transaction), phase by phase:

* start-up over an empty replica (expected: LIST, then the snapshot PUT);
* steady writes for 60 s (15 s with `--quick`);
* idle for 60 s (15 s): the claim is zero requests;
* SIGTERM, then a second daemon over the unchanged WAL: its start-up should resume (LIST and
  one GET of the newest object's header, no snapshot).

Run 2 (not with `--quick`), a fresh database at 500 txn/s for 60 s, for comparison with
Litestream's published figures: requests/s, bytes uploaded, daemon CPU-s and peak RSS, peak
WAL size.

A phase's requests are extrapolated to an hour over its own length (start-up phases are one-off
costs and are not).  "Uploaded" is request body bytes seen by the proxy; "captured" is
``replicad_captured_bytes_total``: page bytes of the committed WAL frames the daemon read.
The daemon's CPU (utime+stime) and peak RSS (VmHWM) come from /proc.  kB and MB are 10**3
and 10**6 bytes.  Results and how to read them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench.common import (
    BenchError,
    PeakSize,
    Poller,
    init_db,
    log_events,
    machine,
    print_table,
    read_commits,
    s3_env,
    s3_url,
    start_writer,
)
from tests.faultproxy import FaultProxy
from tests.measure import ProcUsage, proc_usage
from tests.procs import (
    HOST,
    Daemon,
    Metrics,
    wait_for_async,
)
from tests.s3servers import S3Server, create_bucket, start_rclone, unique_bucket

DEFAULT_SECONDS = 60.0
QUICK_SECONDS = 15.0
RATE = 100.0
HIGH_RATE = 500.0
HIGH_SECONDS = 60.0
ROW_BYTES = 1024
PREFIX = "apps/app1"
#: Seconds a start-up phase goes on after its last expected request, so that a stray one
#: after it would still be counted in it.
SETTLE = 3.0
#: Seconds allowed for a daemon to start and reach its replica, and for a backlog to ship.
START_TIMEOUT = 60.0
CATCH_UP_TIMEOUT = 120.0
#: How often the -wal file's size is sampled.
WAL_POLL_INTERVAL = 0.05
#: Log events that end a daemon's start-up: it resumed, or its first snapshot is uploaded.
STARTED_EVENTS = frozenset({"resumed from replica", "snapshot uploaded"})
OPERATIONS = ("LIST", "GET", "HEAD", "PUT", "MULTIPART", "DELETE")
#: Where the fencing lease's objects live under the replica prefix (`replicad.lease`), as a
#: path and as a URL-encoded ``prefix=`` of a LIST.
_LEASE_MARKS = (b"/lease/", b"%2Flease%2F")
_T = TypeVar("_T")


class CountingProxy(FaultProxy):
    """A `FaultProxy` without faults that also counts S3 operations and request body bytes."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        #: Requests forwarded, by S3 operation (see `s3_operation`).
        self.operations: Counter[str] = Counter()
        #: Request body bytes forwarded (uploads; LIST and GET have no body).
        self.body_bytes = 0
        #: Requests on the fencing lease's objects (`replicad.lease`), all operations.
        self.lease_requests = 0

    async def _forward(
        self, request_line: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> bytes:
        self.operations[s3_operation(request_line)] += 1
        self.body_bytes += len(body)
        self.lease_requests += is_lease_request(request_line, body)
        return await super()._forward(request_line, headers, body)

    def tally(self) -> Tally:
        """The counters now (a copy)."""
        return Tally(Counter(self.operations), self.body_bytes, self.lease_requests)


def s3_operation(request_line: bytes) -> str:
    """The S3 operation of a path-style request: LIST, GET, HEAD, PUT, DELETE, or MULTIPART
    for the calls of a multipart upload (create, part, complete, abort).
    """
    method, _, rest = request_line.decode("ascii", "replace").partition(" ")
    target = rest.rpartition(" ")[0]
    path, _, query = target.partition("?")
    if "uploads" in query.split("&") or "uploadId=" in query:
        return "MULTIPART"
    if method == "GET":
        # A GET of the bucket (no key after it) is a listing.
        return "LIST" if "/" not in path.strip("/") else "GET"
    if method == "POST" and "delete" in query.split("&"):
        return "DELETE"
    return method


def is_lease_request(request_line: bytes, body: bytes) -> bool:
    """Whether a request reads, writes, lists or deletes the fencing lease's objects."""
    target = request_line.split(b" ")[1]
    if b"?delete" in target:  # DeleteObjects names its keys in the body
        return _LEASE_MARKS[0] in body
    return any(mark in target for mark in _LEASE_MARKS)


@dataclass(frozen=True, slots=True)
class Tally:
    """The proxy's counters at one moment."""

    operations: Counter[str]
    body_bytes: int
    lease_requests: int

    def __sub__(self, earlier: Tally) -> Tally:
        ops = Counter(self.operations)
        ops.subtract(earlier.operations)
        return Tally(
            +ops, self.body_bytes - earlier.body_bytes, self.lease_requests - earlier.lease_requests
        )


@dataclass(frozen=True, slots=True)
class Phase:
    """What one phase cost."""

    name: str
    #: The phase's length for extrapolation, or None for a one-off (start-up).
    seconds: float | None
    transactions: int
    requests: Tally
    #: Requests the daemon counted itself (``replicad_replica_requests_total``), all operations.
    daemon_requests: int
    daemon_uploaded_bytes: int
    captured_bytes: int
    cpu_seconds: float
    #: The daemon's peak RSS (VmHWM) at the end of the phase, bytes (0: not measured).
    peak_rss_bytes: int


async def _scrape(daemon: Daemon) -> Metrics:
    """A scrape of the daemon's metrics, off the event loop that runs the proxy."""
    return await asyncio.to_thread(daemon.metrics)


@dataclass
class Bench:
    """The server, the proxy and one database's files for a run."""

    root: Path
    server: S3Server
    proxy: CountingProxy
    bucket: str = field(default_factory=unique_bucket)

    @property
    def db(self) -> Path:
        """The application's database."""
        return self.root / "app.db"

    @property
    def url(self) -> str:
        """The replica URL, through the proxy."""
        return s3_url(self.server, self.bucket, PREFIX, endpoint=self.proxy.url)

    async def prepare(self) -> None:
        """An empty database and an empty bucket."""
        self.root.mkdir(parents=True)
        await create_bucket(self.server, self.bucket)  # directly: not counted
        await asyncio.to_thread(init_db, self.db)

    async def start_daemon(self, n: int) -> Daemon:
        """Start daemon number `n` of this run (its log: ``daemon-N.log``)."""
        log = self.root / f"daemon-{n}.log"
        return Daemon.start([str(self.db), self.url], log, env=s3_env(self.server, self.root))

    async def measure(
        self, name: str, daemon: Daemon, seconds: float | None, body: Callable[[], Awaitable[_T]]
    ) -> tuple[Phase, _T]:
        """Run `body`; what the proxy and the daemon counted meanwhile, and what it returned."""
        tally, before, usage = (
            self.proxy.tally(),
            await _scrape(daemon),
            proc_usage(daemon.proc.pid),
        )
        result = await body()
        after = await _scrape(daemon)
        requests = self.proxy.tally() - tally
        phase = _phase(
            name, seconds, requests=requests, before=before, after=after, usage=usage, daemon=daemon
        )
        return phase, result


def _phase(
    name: str,
    seconds: float | None,
    *,
    requests: Tally,
    before: Metrics,
    after: Metrics,
    usage: ProcUsage,
    daemon: Daemon,
) -> Phase:
    def delta(metric: str) -> int:
        return round(after.value(metric) - before.value(metric))

    end = proc_usage(daemon.proc.pid)
    return Phase(
        name=name,
        seconds=seconds,
        transactions=delta("replicad_transactions_total"),
        requests=requests,
        daemon_requests=delta("replicad_replica_requests_total"),
        daemon_uploaded_bytes=delta("replicad_replica_uploaded_bytes_total"),
        captured_bytes=delta("replicad_captured_bytes_total"),
        cpu_seconds=end.cpu_seconds - usage.cpu_seconds,
        peak_rss_bytes=end.peak_rss_bytes,
    )


# -- waiting ---------------------------------------------------------------------------------


async def _started(daemon: Daemon) -> None:
    """Wait for the daemon to resume or upload its first snapshot, and for the metrics."""

    async def ready() -> bool:
        daemon.check_running(BenchError)
        events = await asyncio.to_thread(log_events, daemon.log)
        return any(e.get("event") in STARTED_EVENTS for e in events)

    await wait_for_async(
        ready, START_TIMEOUT, "the daemon's start-up", error=BenchError, interval=0.05
    )
    await asyncio.sleep(SETTLE)


async def _write(bench: Bench, daemon: Daemon, *, rate: float, seconds: float, tag: str) -> float:
    """Run the writer to completion, then wait until the replica holds its last commit.

    Returns the writer's commits per second (it may fall behind its schedule).
    """
    count = round(rate * seconds)
    target = (await _scrape(daemon)).value("replicad_replica_txid") + count
    log = bench.root / f"writer-{tag}.log"
    writer = start_writer(bench.db, log, rate=rate, count=count, row_bytes=ROW_BYTES)
    try:
        await wait_for_async(
            lambda: _exited(writer),
            seconds * 3 + 60,
            f"the writer's {count} commits",
            error=BenchError,
            interval=0.05,
        )
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    if writer.returncode != 0:
        raise BenchError(f"the writer failed with status {writer.returncode}")

    async def shipped() -> bool:
        return (await _scrape(daemon)).value("replicad_replica_txid") >= target

    await wait_for_async(
        shipped, CATCH_UP_TIMEOUT, f"replica TXID {target:.0f}", error=BenchError, interval=0.05
    )
    commits = read_commits(log)
    return (len(commits) - 1) / ((commits[-1].time_ns - commits[0].time_ns) / 1e9)


async def _exited(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


# -- the runs --------------------------------------------------------------------------------


async def cost_run(bench: Bench, *, seconds: float) -> list[Phase]:
    """Run 1: start-up, steady 100 txn/s, idle, restart; one `Phase` each."""
    await bench.prepare()
    phases = []
    daemon = await bench.start_daemon(1)
    try:
        # The daemon is started inside the phase, so its metrics are not up yet: count its
        # start-up from the proxy alone, then take the daemon's own totals after it.
        start = bench.proxy.tally()
        await _started(daemon)
        phases.append(await _startup_phase("start-up, empty replica", bench, daemon, start))
        writes, _ = await bench.measure(
            f"writes {RATE:g} txn/s",
            daemon,
            seconds,
            lambda: _write(bench, daemon, rate=RATE, seconds=seconds, tag="100"),
        )
        idle, _ = await bench.measure("idle", daemon, seconds, lambda: asyncio.sleep(seconds))
        phases += [writes, idle]
        shutdown = bench.proxy.tally()
        await asyncio.to_thread(daemon.stop, error=BenchError)
        phases.append(_proxy_only_phase("shutdown (SIGTERM)", bench.proxy.tally() - shutdown))
        daemon = await bench.start_daemon(2)
        start = bench.proxy.tally()
        await _started(daemon)
        phases.append(await _startup_phase("restart, unchanged WAL", bench, daemon, start))
        await asyncio.to_thread(daemon.stop, error=BenchError)
    finally:
        daemon.kill()
    _check_expectations(phases, restart_log=bench.root / "daemon-2.log")
    return phases


async def _startup_phase(name: str, bench: Bench, daemon: Daemon, start: Tally) -> Phase:
    metrics = await _scrape(daemon)
    empty = Metrics({})
    requests = bench.proxy.tally() - start
    return _phase(
        name,
        None,
        requests=requests,
        before=empty,
        after=metrics,
        usage=ProcUsage(0, 0),
        daemon=daemon,
    )


def _proxy_only_phase(name: str, requests: Tally) -> Phase:
    return Phase(name, None, 0, requests, 0, 0, 0, 0.0, 0)


def _check_expectations(phases: list[Phase], *, restart_log: Path) -> None:
    """Report (not fail) departures from the claims; the tables show the numbers."""
    for phase in phases:
        ops = phase.requests.operations
        if phase.name == "idle" and ops.total():
            print(f"NOTE: {ops.total()} requests while idle: {dict(ops)}")
    events = {e.get("event") for e in log_events(restart_log)}
    if "resumed from replica" not in events or "snapshot uploaded" in events:
        print(f"NOTE: {restart_log.name} did not resume from the replica without a snapshot")


@dataclass(frozen=True, slots=True)
class HighRate:
    """Run 2: one steady phase at a high rate."""

    phase: Phase
    achieved_rate: float
    total: ProcUsage
    peak_wal_bytes: int
    db_bytes: int


async def high_rate_run(bench: Bench, *, rate: float, seconds: float) -> HighRate:
    """Run 2: a fresh database, start-up, then `rate` txn/s for `seconds`."""
    await bench.prepare()
    daemon = await bench.start_daemon(1)
    wal = PeakSize(bench.db.with_name(bench.db.name + "-wal"))
    try:
        await _started(daemon)
        with Poller([wal], interval=WAL_POLL_INTERVAL):
            phase, achieved = await bench.measure(
                f"writes {rate:g} txn/s",
                daemon,
                seconds,
                lambda: _write(bench, daemon, rate=rate, seconds=seconds, tag="high"),
            )
        total = proc_usage(daemon.proc.pid)
        await asyncio.to_thread(daemon.stop, error=BenchError)
    finally:
        daemon.kill()
    return HighRate(phase, achieved, total, wal.peak, bench.db.stat().st_size)


# -- report ----------------------------------------------------------------------------------

COST_HEADERS = (
    "phase",
    "seconds",
    "txns",
    *OPERATIONS,
    "requests",
    "of which lease",
    "daemon-counted",
    "requests/hour",
    "uploaded (kB)",
    "captured WAL (kB)",
    "uploaded/WAL",
    "daemon CPU-s",
    "peak RSS (MB)",
)

HIGH_HEADERS = (
    "rate (txn/s)",
    "achieved (txn/s)",
    "txns",
    "requests",
    "requests/s",
    "PUT",
    "of which lease",
    "uploaded MB",
    "captured WAL MB",
    "daemon CPU-s (writes)",
    "daemon CPU-s (process)",
    "peak RSS (MB)",
    "peak WAL (MB)",
    "database (MB)",
)


def cost_row(p: Phase) -> list[object]:
    """One phase of run 1."""
    ops = p.requests.operations
    total = ops.total()
    captured = p.captured_bytes
    return [
        p.name,
        "one-off" if p.seconds is None else round(p.seconds),
        p.transactions,
        *(ops[op] for op in OPERATIONS),
        total,
        p.requests.lease_requests,
        p.daemon_requests if p.daemon_requests or total == 0 else "-",
        "-" if p.seconds is None else round(total / p.seconds * 3600),
        round(p.requests.body_bytes / 1e3),
        round(captured / 1e3),
        round(p.requests.body_bytes / captured, 3) if captured else "-",
        round(p.cpu_seconds, 2),
        round(p.peak_rss_bytes / 1e6, 1) if p.peak_rss_bytes else "-",
    ]


def high_row(rate: float, r: HighRate) -> list[object]:
    """Run 2's one row."""
    p = r.phase
    assert p.seconds is not None
    total = p.requests.operations.total()
    return [
        round(rate),
        round(r.achieved_rate),
        p.transactions,
        total,
        round(total / p.seconds, 2),
        p.requests.operations["PUT"],
        p.requests.lease_requests,
        round(p.requests.body_bytes / 1e6, 1),
        round(p.captured_bytes / 1e6, 1),
        round(p.cpu_seconds, 2),
        round(r.total.cpu_seconds, 2),
        round(r.total.peak_rss_bytes / 1e6, 1),
        round(r.peak_wal_bytes / 1e6, 1),
        round(r.db_bytes / 1e6, 1),
    ]


async def run(root: Path, *, seconds: float, high_rate: bool) -> None:
    """Both runs against one rclone server and proxy; print the tables."""
    server = await asyncio.to_thread(start_rclone, root / "s3")
    try:
        proxy = CountingProxy(server.endpoint_url)
        await proxy.start()
        try:
            phases = await cost_run(Bench(root / "run1", server, proxy), seconds=seconds)
            high = None
            if high_rate:
                bench = Bench(root / "run2", server, proxy)
                high = await high_rate_run(bench, rate=HIGH_RATE, seconds=HIGH_SECONDS)
        finally:
            await proxy.close()
    finally:
        server.stop()
    print_table(COST_HEADERS, [cost_row(p) for p in phases])
    if high is not None:
        print()
        print_table(HIGH_HEADERS, [high_row(HIGH_RATE, high)])


def main() -> None:
    """Run, check and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_SECONDS:.0f} s phases and no {HIGH_RATE:g} txn/s run",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args()
    seconds = QUICK_SECONDS if args.quick else DEFAULT_SECONDS
    print(machine())
    print(
        f"rclone serve s3 behind a counting proxy on {HOST}; {RATE:g} txn/s of one "
        f"{ROW_BYTES}-byte random row each for {seconds:g} s, idle {seconds:g} s; default "
        "sync_interval (1 s)"
    )
    root = Path(tempfile.mkdtemp(prefix="replicad-s3cost-"))
    try:
        asyncio.run(run(root, seconds=seconds, high_rate=not args.quick))
    finally:
        if args.keep:
            print(f"run directory kept: {root}")
        else:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
