"""What age encryption costs: ``python -m bench.crypt [--seconds 60] [--size-mb 200] [--runs 2]``.

1. Steady replication: a daemon replicating to a local directory while the writer commits one
   1024-byte random row per transaction at 500 txn/s for `--seconds`; plaintext and encrypted
   (one X25519 recipient) runs alternate, `--runs` of each.  Compaction is off in both (an
   encrypting daemon without a key cannot compact, so that is the fair comparison).  Reported:
   the daemon's CPU seconds (from /proc, just before SIGTERM), objects and bytes uploaded, and
   the catch-up time: from the writer's last COMMIT returning to the replica's newest segment
   name reaching it (an RPO measure; names are plaintext in both modes).
2. Restore: one daemon with two replicas of one database, plaintext and encrypted, filled to
   about `--size-mb` MB with 100 kB random rows; each replica restored `--runs` + 1 times,
   alternating, timed as a child process (`bench.common.run_measured`).  Local directories,
   or with `--s3` two prefixes of one `rclone serve s3` on 127.0.0.1.
3. Rekey: `replicad rekey` of the encrypted replica to a new recipient, timed; with
   `--small-objects N`, also of a history of about N small objects (1 kB transactions, each
   nearly its own segment), where the per-object requests dominate.

MB are 10**6 bytes.  Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyrage import x25519

from bench.common import (
    init_db,
    machine,
    print_table,
    read_commits,
    s3_env,
    s3_url,
    start_writer,
    tree_size,
)
from replicad.position import parse_key
from tests.measure import MeasuredRun, proc_usage, run_measured
from tests.procs import ROOT, clean_env
from tests.s3servers import create_bucket, start_rclone, unique_bucket

RATE = 500
ROW_BYTES = 1024


def _config(
    path: Path, db: Path, replicas: list[tuple[str, list[str]]], *, sync_interval: float = 1.0
) -> Path:
    text = f"[[databases]]\npath = '{db}'\nsync_interval = {sync_interval}\n"
    for url, recipients in replicas:
        text += (
            f"[[databases.replicas]]\nurl = '{url}'\ncompaction_levels = []\n"
            f"age_recipients = {json.dumps(recipients)}\n"
        )
    path.write_text(text)
    return path


def _daemon(config: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "replicad", "replicate", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(env),
            cwd=ROOT,
        )


def _replicad(args: list[str], env: dict[str, str]) -> MeasuredRun:
    run = run_measured([sys.executable, "-m", "replicad", *args], env=env)
    if run.returncode != 0:
        raise RuntimeError(run.stderr)
    return run


def _listing(url: str, env: dict[str, str], key: Path) -> tuple[int, int]:
    """(objects, bytes) of a replica, from `replicad ls --json`."""
    run = _replicad(["ls", "--json", url, "--age-identity-file", str(key)], env)
    summary = json.loads(run.stdout)
    return int(summary["objects"]), int(summary["bytes"])


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _newest_txid(rep: Path) -> int:
    best = 0
    for path in rep.glob("segments/00/*"):
        name = parse_key(path.relative_to(rep).as_posix())
        if name is not None:
            best = max(best, name.last_txid)
    return best


def _snapshot_exists(rep: Path) -> bool:
    return any(rep.glob("snapshots/*.snap"))


def steady(work: Path, mode: str, seconds: float, recipient: str) -> list[object]:
    """One steady-replication run; its table row."""
    db, rep = work / "app.db", work / "rep"
    init_db(db)
    config = _config(work / "c.toml", db, [(rep.as_uri(), [recipient] if mode == "age" else [])])
    daemon = _daemon(config, work / "d.log")
    try:
        _wait(lambda: _snapshot_exists(rep), 30, "the first snapshot")
        base = _newest_txid(rep) or max(
            parse_key(p.relative_to(rep).as_posix()).last_txid  # type: ignore[union-attr]
            for p in rep.glob("snapshots/*.snap")
        )
        count = int(RATE * seconds)
        writer = start_writer(db, work / "w.log", rate=RATE, count=count, row_bytes=ROW_BYTES)
        if writer.wait(timeout=seconds * 4 + 60) != 0:
            raise RuntimeError("writer failed")
        last = read_commits(work / "w.log")[-1]
        _wait(lambda: _newest_txid(rep) >= base + count, 60, "catch-up")
        catch_up = time.time_ns() - last.time_ns
        usage = proc_usage(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        status = daemon.wait(timeout=120)
    if status != 0:
        raise RuntimeError(f"daemon exited {status}: {(work / 'd.log').read_text()[-2000:]}")
    objects, size = tree_size(rep / "segments")
    return [
        mode,
        round(usage.cpu_seconds, 2),
        objects,
        round(size / 1e6, 1),
        round(catch_up / 1e9, 2),
    ]


def build_history(
    work: Path, size_mb: int, recipient: str, urls: tuple[str, str], env: dict[str, str]
) -> Path:
    """A database of about `size_mb` MB replicated to `urls` (plaintext, encrypted) by one
    daemon; the database.
    """
    db = work / "app.db"
    init_db(db)
    config = _config(work / "c.toml", db, [(urls[0], []), (urls[1], [recipient])])
    daemon = _daemon(config, work / "d.log", env)
    try:
        _wait(lambda: "snapshot taken" in (work / "d.log").read_text(), 60, "the snapshot")
        writer = start_writer(db, work / "w.log", rate=2000, count=size_mb * 10, row_bytes=100_000)
        if writer.wait(timeout=3600) != 0:
            raise RuntimeError("writer failed")
    finally:
        daemon.send_signal(signal.SIGTERM)
        if daemon.wait(timeout=300) != 0:
            raise RuntimeError((work / "d.log").read_text()[-2000:])
    return db


def restore_row(
    url: str, out: Path, identity: Path | None, db_bytes: int, env: dict[str, str]
) -> list[object]:
    """One restore of `url` into `out`, timed: a table row."""
    args = ["restore", "-o", str(out), url]
    if identity is not None:
        args += ["--age-identity-file", str(identity)]
    run = _replicad(args, env)
    out.unlink()
    return [
        "age" if identity else "plain",
        round(run.wall_seconds, 2),
        round(db_bytes / 1e6 / run.wall_seconds, 1),
        round(run.cpu_seconds, 2),
        round(run.peak_rss_bytes / 1e6),
    ]


def restore_and_rekey(root: Path, args: argparse.Namespace, key_file: Path, recipient: str) -> None:
    """Parts 2 and 3, against local directories or (`--s3`) a local `rclone serve s3`."""
    work = root / "history"
    work.mkdir()
    server = None
    env: dict[str, str] = {}
    if args.s3:
        server = start_rclone(root / "s3")
        bucket = unique_bucket()
        asyncio.run(create_bucket(server, bucket))
        urls = (s3_url(server, bucket, "plain"), s3_url(server, bucket, "sealed"))
        env = s3_env(server, root)
    else:
        urls = ((work / "plain").as_uri(), (work / "sealed").as_uri())
    try:
        db = build_history(work, args.size_mb, recipient, urls, env)
        db_bytes = db.stat().st_size
        rows = []
        for _ in range(args.runs + 1):
            rows.append(restore_row(urls[0], work / "out.db", None, db_bytes, env))
            rows.append(restore_row(urls[1], work / "out.db", key_file, db_bytes, env))
        where = "rclone serve s3 on 127.0.0.1" if args.s3 else "local directories"
        print(f"\nRestore of {db_bytes / 1e6:.0f} MB (latest) from {where}")
        print_table(["mode", "wall s", "MB/s", "CPU s", "peak RSS MB"], rows)

        print(f"\nRekey of the encrypted replica, {where}")
        print_table(_REKEY_HEADERS, [rekey_row(urls[1], env, key_file, work)])
        if args.small_objects:
            small = urls[1].replace("sealed", "small")
            small_history(work / "small", args.small_objects, recipient, small, env)
            print(f"\nRekey of a history of small objects, {where}")
            print_table(_REKEY_HEADERS, [rekey_row(small, env, key_file, work)])
    finally:
        if server is not None:
            server.stop()


_REKEY_HEADERS = ["objects", "MB", "wall s", "MB/s", "objects/s", "CPU s", "peak RSS MB"]


def rekey_row(url: str, env: dict[str, str], key_file: Path, work: Path) -> list[object]:
    """`replicad rekey` of `url` to a new recipient, timed; its table row."""
    objects, size = _listing(url, env, key_file)
    new = str(x25519.Identity.generate().to_public())
    rekey = ["rekey", url, "--age-identity-file", str(key_file), "--to", new]
    run = _replicad([*rekey, "--spool-dir", str(work)], env)
    return [
        objects,
        round(size / 1e6, 1),
        round(run.wall_seconds, 2),
        round(size / 1e6 / run.wall_seconds, 1),
        round(objects / run.wall_seconds, 1),
        round(run.cpu_seconds, 2),
        round(run.peak_rss_bytes / 1e6),
    ]


def small_history(work: Path, count: int, recipient: str, url: str, env: dict[str, str]) -> None:
    """About `count` small encrypted objects: 1 kB transactions at 40 txn/s with a 20 ms sync
    interval, so nearly every transaction is its own segment.
    """
    work.mkdir()
    db = work / "app.db"
    init_db(db)
    config = _config(work / "c.toml", db, [(url, [recipient])], sync_interval=0.02)
    daemon = _daemon(config, work / "d.log", env)
    try:
        _wait(lambda: "snapshot taken" in (work / "d.log").read_text(), 60, "the snapshot")
        writer = start_writer(db, work / "w.log", rate=40, count=count, row_bytes=ROW_BYTES)
        if writer.wait(timeout=count + 60) != 0:
            raise RuntimeError("writer failed")
    finally:
        daemon.send_signal(signal.SIGTERM)
        if daemon.wait(timeout=300) != 0:
            raise RuntimeError((work / "d.log").read_text()[-2000:])


def main() -> None:
    """Run the encryption benchmarks and print their tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="steady run length")
    parser.add_argument("--size-mb", type=int, default=200, help="restore/rekey database size")
    parser.add_argument("--runs", type=int, default=2, help="runs per mode")
    parser.add_argument("--skip-steady", action="store_true", help="parts 2 and 3 only")
    parser.add_argument("--s3", action="store_true", help="restore and rekey through rclone S3")
    parser.add_argument(
        "--small-objects", type=int, default=0, help="also rekey a history of this many objects"
    )
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench-crypt-") as tmp:
        root = Path(tmp)
        identity = x25519.Identity.generate()
        key_file = root / "a.key"
        key_file.write_text(f"{identity}\n")
        recipient = str(identity.to_public())
        if not args.skip_steady:
            rows = []
            for run in range(args.runs):
                for mode in ("plain", "age"):
                    work = root / f"steady-{mode}-{run}"
                    work.mkdir()
                    rows.append(steady(work, mode, args.seconds, recipient))
                    shutil.rmtree(work)
            print(f"\nSteady replication, {RATE} txn/s x {ROW_BYTES} B for {args.seconds:g} s")
            print_table(["mode", "daemon CPU s", "segments", "segment MB", "catch-up s"], rows)

        restore_and_rekey(root, args, key_file, recipient)


if __name__ == "__main__":
    main()
