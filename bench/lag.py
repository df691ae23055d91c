"""Replication lag from commit to replica: ``python -m bench.lag`` from the repo root.

    python -m bench.lag [--rate 100] [--seconds 30] [--row-bytes 1024] [--quick] [--runs N]
                        [--keep]

One run: a fresh database in a temporary directory; the daemon as its own process,
``replicad replicate DB file:///TMP/replica``; once its first snapshot (TXID 1) is in the
replica and the daemon is idle, a writer process (`bench.common`) commits one row per
transaction at `rate` per second and logs when each COMMIT was issued and when it returned.
Meanwhile this process lists ``segments/00/`` every 2 ms and stamps each new segment with the
time it first appeared.  Writer commit k is replica TXID k+1 (the snapshot took TXID 1), so the
lag of commit k is the first-seen time of the segment holding TXID k+1 minus the time COMMIT k
returned.  That mapping is checked, not assumed: the snapshot must be TXID 1, the segments must
cover exactly TXIDs 2..commits+1 with no gap, and no segment may be seen before the COMMIT of a
transaction it holds was issued; otherwise the run fails rather than report numbers for the
wrong transactions.

Once the last commit is in the replica, the daemon's CPU time and peak RSS are read from /proc,
it gets SIGTERM (exit status must be 0), and a restore must hold exactly the writer's rows.
MB are 10**6 bytes.  Results and how to read them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    BenchError,
    Commit,
    DirectoryWatch,
    PeakSize,
    Poller,
    RunFiles,
    init_db,
    machine,
    percentile,
    print_table,
    read_commits,
    start_writer,
    tree_size,
)
from replicad.position import ObjectKind, ObjectName, parse_key
from tests.measure import ProcUsage, proc_usage
from tests.procs import log_tail, replicad, start_daemon, stop, wait_for

DEFAULT_RATE = 100.0
DEFAULT_SECONDS = 30.0
QUICK_SECONDS = 10.0
DEFAULT_ROW_BYTES = 1024
SEGMENT_PREFIX = "segments/00/"
SNAPSHOT_PREFIX = "snapshots/"
#: Seconds allowed for the daemon to start and upload its first snapshot.
SNAPSHOT_TIMEOUT = 30.0
#: Seconds between the snapshot's upload and the first commit: more than the daemon's
#: sync_interval (1 s), so every run starts against an idle daemon, whose first commit ships
#: at once.
IDLE_BEFORE_WRITES = 1.5
#: Seconds allowed, after the writer's last commit, for that commit to reach the replica.
CATCH_UP_TIMEOUT = 30.0
#: A segment first seen less than this after the previous one was written in the same upload
#: slot (slots are sync_interval = 1 s apart).
SAME_SLOT_MS = 100
#: The daemon's first snapshot is TXID 1, so writer commit k is replica TXID k + 1.
TXID_OFFSET = 1


@dataclass(frozen=True, slots=True)
class Paths(RunFiles):
    """The files of one run, all under one temporary directory."""

    @property
    def replica(self) -> Path:
        """The replica directory."""
        return self.root / "replica"

    @property
    def daemon_log(self) -> Path:
        """The daemon's JSON log."""
        return self.root / "daemon.log"

    @property
    def restored(self) -> Path:
        """Where the final restore writes."""
        return self.root / "restored.db"


@dataclass(frozen=True, slots=True)
class Segment:
    """A level-0 segment and when this process first saw it."""

    name: ObjectName
    seen_ns: int


@dataclass(frozen=True, slots=True)
class Result:
    """Everything measured in one run."""

    rate: float
    commits: list[Commit]
    lags_ms: list[float]  # in commit order
    segments: list[Segment]
    startup: ProcUsage
    usage: ProcUsage
    objects: int
    bytes_uploaded: int
    peak_wal_bytes: int

    @property
    def duration(self) -> float:
        """Seconds from the first commit to the last."""
        return (self.commits[-1].time_ns - self.commits[0].time_ns) / 1e9


def run_once(paths: Paths, *, rate: float, seconds: float, row_bytes: int) -> Result:
    """One measured run in `paths.root` (an empty directory)."""
    count = round(rate * seconds)
    init_db(paths.db)
    watch = DirectoryWatch(paths.replica / SEGMENT_PREFIX, SEGMENT_PREFIX)
    wal = PeakSize(paths.wal)
    daemon = start_daemon([str(paths.db), paths.replica.as_uri()], paths.daemon_log)
    writer: subprocess.Popen[bytes] | None = None
    try:
        wait_for(
            lambda: bool(_snapshots(paths.replica)),
            SNAPSHOT_TIMEOUT,
            "a snapshot in the replica",
            log=paths.daemon_log,
            error=BenchError,
        )
        time.sleep(IDLE_BEFORE_WRITES)
        startup = proc_usage(daemon.pid)
        with Poller([watch, wal]):
            writer = start_writer(
                paths.db, paths.writer_log, rate=rate, count=count, row_bytes=row_bytes
            )
            if writer.wait(timeout=seconds * 2 + 60) != 0:
                raise BenchError(f"the writer failed with status {writer.returncode}")
            last = count + TXID_OFFSET
            wait_for(
                lambda: _last_txid(watch) >= last,
                CATCH_UP_TIMEOUT,
                f"TXID {last} in the replica",
                log=paths.daemon_log,
                error=BenchError,
            )
        usage = proc_usage(daemon.pid)
        status = stop(daemon)
    finally:
        for proc in (writer, daemon):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    if status != 0:
        raise BenchError(f"the daemon exited with status {status}\n{log_tail(paths.daemon_log)}")
    commits = read_commits(paths.writer_log)
    segments = _segments(watch)
    _check_mapping(paths.replica, commits, segments, count)
    _check_restore(paths, count)
    objects, size = tree_size(paths.replica)
    return Result(
        rate=rate,
        commits=commits,
        lags_ms=_lags_ms(commits, segments),
        segments=segments,
        startup=startup,
        usage=usage,
        objects=objects,
        bytes_uploaded=size,
        peak_wal_bytes=wal.peak,
    )


def _snapshots(replica: Path) -> list[ObjectName]:
    directory = replica / SNAPSHOT_PREFIX
    if not directory.is_dir():
        return []
    names = (parse_key(SNAPSHOT_PREFIX + p.name) for p in directory.iterdir())
    return sorted(n for n in names if n is not None)


def _last_txid(watch: DirectoryWatch) -> int:
    names = (parse_key(key) for key in watch.first_seen())
    return max((n.last_txid for n in names if n is not None), default=0)


def _segments(watch: DirectoryWatch) -> list[Segment]:
    segments = []
    for key, seen_ns in watch.first_seen().items():
        name = parse_key(key)
        if name is None or name.kind is not ObjectKind.SEGMENT:
            raise BenchError(f"unexpected object {key} in the replica")
        segments.append(Segment(name, seen_ns))
    return sorted(segments, key=lambda s: s.name)


def _check_mapping(
    replica: Path, commits: list[Commit], segments: list[Segment], count: int
) -> None:
    """Fail unless commit k is exactly replica TXID k + 1 for every k."""
    if [c.k for c in commits] != list(range(1, count + 1)):
        raise BenchError(f"the writer logged {len(commits)} commits, not 1..{count} in order")
    snapshots = [n.last_txid for n in _snapshots(replica)]
    if snapshots != [TXID_OFFSET]:
        raise BenchError(f"expected one snapshot at TXID {TXID_OFFSET}, found {snapshots}")
    expected = TXID_OFFSET + 1
    for segment in segments:
        if segment.name.first_txid != expected:
            raise BenchError(f"segment {segment.name.key} does not start at TXID {expected}")
        expected = segment.name.last_txid + 1
    if expected - 1 != count + TXID_OFFSET:
        raise BenchError(
            f"segments end at TXID {expected - 1}, but the writer's last commit {count} should be "
            f"TXID {count + TXID_OFFSET}: the commit-to-TXID mapping does not hold"
        )


def _lags_ms(commits: list[Commit], segments: list[Segment]) -> list[float]:
    """Lags in commit order, from COMMIT returning; slightly negative when the daemon shipped
    the transaction while COMMIT was still fsyncing or checkpointing.  Fails if a segment was
    seen before the COMMIT of a transaction it holds was even issued.
    """
    firsts = [s.name.first_txid for s in segments]
    lags = []
    for commit in commits:
        segment = segments[bisect.bisect_right(firsts, commit.k + TXID_OFFSET) - 1]
        if segment.seen_ns < commit.start_ns:
            raise BenchError(
                f"commit {commit.k} was seen in {segment.name.key} "
                f"{(commit.start_ns - segment.seen_ns) / 1e6:.1f} ms before the writer issued "
                "COMMIT: the commit-to-TXID mapping is wrong"
            )
        lags.append((segment.seen_ns - commit.time_ns) / 1e6)
    return lags


def _check_restore(paths: Paths, count: int) -> None:
    result = replicad("restore", "-o", str(paths.restored), paths.replica.as_uri())
    if result.returncode != 0:
        raise BenchError(f"restore failed: {result.stderr.strip()}")
    conn = sqlite3.connect(f"file:{paths.restored}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT count(*) FROM rows").fetchone()[0]
    finally:
        conn.close()
    if rows != count:
        raise BenchError(f"the restored database has {rows} rows, the writer committed {count}")


# -- report ----------------------------------------------------------------------------------

LAG_HEADERS = (
    "rate (txn/s)",
    "duration (s)",
    "commits",
    "lag p50 (ms)",
    "p90",
    "p99",
    "max",
    "daemon CPU-s",
    "peak RSS (MB)",
    "objects",
    "uploaded (MB)",
    "peak WAL (MB)",
)

TIME_HEADERS = (
    "run",
    "segments",
    "txns/segment p50",
    "segments/s",
    "same-slot segments",
    "commit 1 lag (ms)",
    "lag min (ms)",
    "commit to capture p50 (ms)",
    "capture to visible p50 (ms)",
    "COMMIT p99 (ms)",
    "COMMIT max (ms)",
    "start-up CPU-s",
)


def lag_row(r: Result) -> list[object]:
    """One row of the main table."""
    lags = sorted(r.lags_ms)
    return [
        round(r.rate),
        round(r.duration, 1),
        len(r.commits),
        *(round(percentile(lags, f)) for f in (0.5, 0.9, 0.99, 1.0)),
        round(r.usage.cpu_seconds, 2),
        round(r.usage.peak_rss_bytes / 1e6, 1),
        r.objects,
        round(r.bytes_uploaded / 1e6, 1),
        round(r.peak_wal_bytes / 1e6, 1),
    ]


def time_row(run: int, r: Result) -> list[object]:
    """Where the lag comes from, from the segments' names and first-seen times.

    A segment's name carries the daemon's capture times (ms) of its first and last
    transaction: capture minus the writer's commit time is the wake-up and read delay;
    first-seen minus the last capture is the rest of the wait for the upload slot plus encode
    and write.  COMMIT is how long the writer's COMMIT took (WAL fsync, autocheckpoint): a lag
    can be that much below zero.  Same-slot segments are written right after another one: what
    was captured while the slot's first write was in flight.
    """
    commit_ns = {c.k: c.time_ns for c in r.commits}
    segs = r.segments
    capture = [s.name.min_time_ms - commit_ns[s.name.first_txid - TXID_OFFSET] / 1e6 for s in segs]
    commit_ms = sorted((c.time_ns - c.start_ns) / 1e6 for c in r.commits)
    visible = [s.seen_ns / 1e6 - s.name.max_time_ms for s in segs]
    return [
        run,
        len(segs),
        percentile(sorted(s.name.last_txid - s.name.first_txid + 1 for s in segs), 0.5),
        round(len(segs) / r.duration, 2),
        sum(b.seen_ns - a.seen_ns < SAME_SLOT_MS * 1e6 for a, b in itertools.pairwise(segs)),
        round(r.lags_ms[0]),
        round(min(r.lags_ms)),
        round(statistics.median(capture)),
        round(statistics.median(visible)),
        round(percentile(commit_ms, 0.99), 1),
        round(commit_ms[-1]),
        round(r.startup.cpu_seconds, 2),
    ]


def main() -> None:
    """Run, check and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="transactions/s")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="write duration")
    parser.add_argument("--row-bytes", type=int, default=DEFAULT_ROW_BYTES, help="payload size")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SECONDS:.0f} s of writes")
    parser.add_argument("--runs", type=int, default=1, help="repeat, one table row per run")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory")
    args = parser.parse_args()
    seconds = QUICK_SECONDS if args.quick else args.seconds
    print(machine())
    print(
        f"{args.rate:g} txn/s for {seconds:g} s, one {args.row_bytes}-byte random row per "
        "transaction, local directory replica, default sync_interval (1 s)"
    )
    results = []
    for _ in range(args.runs):
        root = Path(tempfile.mkdtemp(prefix="replicad-lag-"))
        try:
            results.append(
                run_once(Paths(root), rate=args.rate, seconds=seconds, row_bytes=args.row_bytes)
            )
        finally:
            if args.keep:
                print(f"run directory kept: {root}")
            else:
                shutil.rmtree(root)
    print_table(LAG_HEADERS, [lag_row(r) for r in results])
    print()
    print_table(TIME_HEADERS, [time_row(i, r) for i, r in enumerate(results, 1)])


if __name__ == "__main__":
    main()
