"""Follow mode and restore drills, measured from the outside.

Lag: a writer process commits one-row transactions at a fixed rate, the daemon ships them to a
local replica, and a follower (`replicad restore --follow`) keeps a copy.  This process polls the
copy every 5 ms with an ordinary sqlite3 connection and records when each row first becomes
visible; a transaction's lag is that moment minus when its COMMIT returned in the writer.  The
follower's CPU and peak RSS come from /proc, its requests from the JSON line it prints at exit.

Drill: a database of about `--drill-mb` MB is replicated (snapshot), then `replicad verify` and
`replicad verify --restore` run as measured child processes (wall, CPU, peak RSS from wait4).

    python -m bench.follow [--rates 100,500] [--seconds 30] [--drill-mb 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import (
    init_db,
    machine,
    percentile,
    print_table,
    read_commits,
    start_writer,
)
from bench.lineage import _fill
from tests.measure import proc_usage, run_measured
from tests.procs import ROOT, clean_env, wait_for

_SAMPLE_SECONDS = 0.005


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "replicad", *args, "--log-format", "json"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            cwd=ROOT,
        )


class _Visibility(threading.Thread):
    """Polls the follower's copy and records when each row id first became visible."""

    def __init__(self, out: Path) -> None:
        super().__init__(daemon=True)
        self.out = out
        self.seen: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.out, isolation_level=None, timeout=30)
        top = 0
        try:
            while not self.stop.is_set():
                newest = conn.execute("SELECT max(id) FROM rows").fetchone()[0] or 0
                now = time.time_ns()
                for k in range(top + 1, newest + 1):
                    self.seen[k] = now
                top = max(top, newest)
                time.sleep(_SAMPLE_SECONDS)
        finally:
            conn.close()


def run_lag(work: Path, rate: float, seconds: float) -> list[object]:
    """A writer at `rate`, the daemon and a follower for `seconds`: the follower's lag row."""
    db, replica, out = work / "app.db", work / "replica", work / "copy.db"
    init_db(db)
    daemon = _start(["replicate", str(db), replica.as_uri()], work / "daemon.log")
    follower: subprocess.Popen[bytes] | None = None
    try:
        wait_for((replica / "snapshots").exists, 30, "the first snapshot")
        follower = _start(["restore", "--follow", "-o", str(out), replica.as_uri()], work / "f.log")
        wait_for(lambda: "restored; following" in (work / "f.log").read_text(), 30, "follower")
        watch = _Visibility(out)
        watch.start()
        before = proc_usage(follower.pid)
        started = time.monotonic()
        count = int(rate * seconds)
        writer = start_writer(db, work / "writer.log", rate=rate, count=count, row_bytes=200)
        writer.wait(timeout=seconds * 3 + 60)
        wait_for(lambda: count in watch.seen, 60, "the follower to catch up")
        elapsed = time.monotonic() - started
        after = proc_usage(follower.pid)
        watch.stop.set()
        watch.join()
    finally:
        if follower is not None:
            follower.send_signal(signal.SIGTERM)
            follower.wait(timeout=60)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    commits = read_commits(work / "writer.log")
    lags = sorted((watch.seen[c.k] - c.time_ns) / 1e6 for c in commits)
    final = json.loads(
        [ln for ln in (work / "f.log").read_text().splitlines() if '"followed"' in ln][-1]
    )
    requests = final["requests"]
    return [
        rate,
        len(commits),
        round(percentile(lags, 0.5)),
        round(percentile(lags, 0.99)),
        round(lags[-1]),
        f"{(after.cpu_seconds - before.cpu_seconds) / elapsed * 100:.1f}%",
        f"{after.peak_rss_bytes / 2**20:.0f}",
        f"{sum(requests.values()) / elapsed:.1f}",
        requests.get("LIST", 0),
        json.dumps(requests, sort_keys=True),
    ]


def run_drill(work: Path, megabytes: int) -> list[list[object]]:
    """Drills (verify, verify --restore) on a database of `megabytes`: their rows."""
    db, replica = work / "big.db", work / "big-replica"
    _fill(db, megabytes)
    daemon = _start(["replicate", str(db), replica.as_uri()], work / "big-daemon.log")
    try:
        wait_for((replica / "snapshots").exists, 300, "the snapshot")
        wait_for(lambda: "snapshot uploaded" in (work / "big-daemon.log").read_text(), 600, "up")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
    rows: list[list[object]] = []
    for label, extra in (("verify (page hashes)", []), ("verify --restore", ["--restore"])):
        cmd = [sys.executable, "-m", "replicad", "verify", replica.as_uri(), *extra]
        cmd += ["--work-dir", str(work)]
        run = run_measured(cmd)
        if run.returncode != 0:
            raise SystemExit(f"{label} failed: {run.stderr}")
        rows.append(
            [
                label,
                f"{db.stat().st_size / 1e6:.0f}",
                f"{run.wall_seconds:.2f}",
                f"{run.cpu_seconds:.2f}",
                f"{run.peak_rss_bytes / 2**20:.0f}",
            ]
        )
    return rows


def main() -> None:
    """Run the follow and drill benchmarks and print their tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="100,500")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--drill-mb", type=int, default=200)
    args = p.parse_args()
    print(machine())
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        work = Path(tempfile.mkdtemp(prefix="bench-follow-"))
        try:
            rows.append(run_lag(work, rate, args.seconds))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print_table(
        [
            "txn/s",
            "txns",
            "lag p50 ms",
            "p99 ms",
            "max ms",
            "follower CPU",
            "peak RSS MiB",
            "requests/s",
            "LIST",
            "requests",
        ],
        rows,
    )
    if args.drill_mb:
        work = Path(tempfile.mkdtemp(prefix="bench-drill-"))
        try:
            drill = run_drill(work, args.drill_mb)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print_table(["drill", "database MB", "wall s", "CPU s", "peak RSS MiB"], drill)


if __name__ == "__main__":
    main()
