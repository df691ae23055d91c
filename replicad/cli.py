"""Command line: argument parsing and the wiring from configuration to objects.

This is the only module that knows both the configuration and the classes it configures.
Expected failures (`ReplicadError`) become one clear message with a hint and an exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import structlog

from replicad import __version__
from replicad.clients.base import ReplicaClient
from replicad.clients.file import FileReplicaClient
from replicad.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_SYNC_INTERVAL,
    Config,
    DatabaseConfig,
    ReplicaConfig,
    Secret,
    config_from_args,
    load_config,
    replica_from_url,
)
from replicad.errors import ConfigError, ReplicadError
from replicad.observe import MetricsServer, configure_logging, parse_address
from replicad.restore import (
    INTEGRITY_MODES,
    Landing,
    RestorePlan,
    RestoreResult,
    check_shortfall,
    iso_ns,
    make_plan,
    parse_timestamp,
    restore,
)

if TYPE_CHECKING:
    from replicad.inspect import LogEntry
    from replicad.replicator import DatabaseReplicator

# The daemon's modules (replicator, database, WAL reader with numpy, file watching, inspection)
# are imported by the commands that use them: a restore, often run where every second of
# start-up counts, needs none of them.

log = structlog.get_logger()
T = TypeVar("T")

#: Attempts per S3 request in the daemon.  Every daemon operation sits in a loop that retries
#: with its own backoff, so botocore's retries only add sleeps: after an outage they kept the
#: replica seconds behind the server's return (`python -m bench.outage`).  One retry still
#: absorbs a single dropped connection.  Restores keep the client's default.
DAEMON_MAX_ATTEMPTS = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with every flag documented in --help."""
    parser = argparse.ArgumentParser(
        prog="replicad",
        description="Continuous backup of SQLite databases (WAL mode) to S3-compatible storage "
        "or a local directory, and point-in-time restore.",
    )
    parser.add_argument("--version", action="version", version=f"replicad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_replicate(sub)
    _add_restore(sub)
    _add_exec(sub)
    _add_snapshot(sub)
    _add_ls(sub)
    _add_log(sub)
    _add_verify(sub)
    _add_config(sub)
    return parser


def _add_verify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify",
        help="prove a replica's history without restoring it",
        description="Download the objects that restore the newest state (or --txid N), check "
        "every block, trailer and recorded database checksum against the pages, and with --db "
        "compare the live database's checksum with the replica's newest state. Exit 0 only "
        "when everything verifies.",
    )
    _add_source(p)
    p.add_argument("--txid", type=int, help="verify the history up to this TXID")
    p.add_argument("--db", type=Path, help="the live database, to compare with the replica")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_logging(p)


def _add_exec(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "exec",
        help="replicate while running the application as a child process",
        description="Start replication (-c CONFIG, or DB_PATH REPLICA_URL), then run CMD. "
        "SIGTERM/SIGINT are forwarded to CMD; when CMD exits, everything committed is flushed "
        "and replicad exits with CMD's status (3 if the flush did not finish). "
        "Usage: replicad exec [-c CONFIG | DB_PATH REPLICA_URL] -- CMD [ARG...]",
    )
    p.add_argument("-c", "--config", type=Path, help=f"TOML file (default {DEFAULT_CONFIG_PATH})")
    p.add_argument("--metrics-addr", metavar="HOST:PORT", help="as for replicate")
    p.add_argument("--takeover", action="store_true", help="as for replicate")
    p.add_argument("words", nargs=argparse.REMAINDER, metavar="[DB_PATH REPLICA_URL] -- CMD")
    _add_logging(p)


def _add_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="configuration tools")
    tools = p.add_subparsers(dest="config_command", required=True, metavar="TOOL")
    check = tools.add_parser(
        "check",
        help="validate a configuration file and print it with defaults filled in",
        description="Exit 0 and print the effective configuration (secrets masked) as JSON, "
        "or exit 2 with the file, key and problem.",
    )
    check.add_argument(
        "-c", "--config", type=Path, help=f"TOML file (default {DEFAULT_CONFIG_PATH})"
    )
    _add_logging(check)


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="DB_PATH/name (with -c) or REPLICA_URL")
    p.add_argument("-c", "--config", type=Path, help="TOML file naming the database's replicas")
    p.add_argument("--replica", help="which of the database's replicas (default: the first)")


def _add_snapshot(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "snapshot",
        help="ask the running daemon to snapshot now",
        description="Signal the replicad daemon replicating these databases (SIGUSR1) to take "
        "a snapshot for every replica at its next sync. With -c, every configured database "
        "unless DB_PATH names one.",
    )
    p.add_argument("db_path", nargs="?", metavar="DB_PATH", help="database file")
    p.add_argument("-c", "--config", type=Path, help="TOML file (needed for a custom state_dir)")
    _add_logging(p)


def _add_ls(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name in ("ls", "status"):
        p = sub.add_parser(
            name,
            help="summarize what a replica holds" + (" (same as ls)" if name == "status" else ""),
            description="Newest TXID and its commit time and age, snapshots, and objects and "
            "bytes per level, from one listing of the replica.",
        )
        _add_source(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        _add_logging(p)


def _add_log(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "log",
        help="list transactions in a time range (to find the bad one)",
        description="TXID, commit time, pages changed and database size of each transaction "
        "committed between --since and --until (RFC 3339), from the replica.",
    )
    _add_source(p)
    p.add_argument("--since", metavar="RFC3339", help="earliest commit time")
    p.add_argument("--until", metavar="RFC3339", help="latest commit time")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    _add_logging(p)


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="default: info"
    )
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        help="auto (default): JSON unless stderr is a terminal",
    )


def _add_replicate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "replicate",
        help="run the daemon: stream every configured database to its replicas",
        description="Replicate databases continuously until SIGTERM/SIGINT, then flush "
        "everything committed and exit (status 0 only if all of it was shipped). Either "
        "-c CONFIG, or the quick form DB_PATH REPLICA_URL.",
    )
    p.add_argument("-c", "--config", type=Path, help=f"TOML file (default {DEFAULT_CONFIG_PATH})")
    p.add_argument("db_path", nargs="?", metavar="DB_PATH", help="database file (quick form)")
    p.add_argument(
        "replica_url",
        nargs="?",
        metavar="REPLICA_URL",
        help="file:///dir or s3://bucket/prefix?endpoint=URL (quick form)",
    )
    p.add_argument(
        "--takeover",
        action="store_true",
        help="write the replicas even if another daemon's lease on them has not expired "
        "(only when that daemon's host is gone)",
    )
    p.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; "
        "use 127.0.0.1 unless the port must be reached from elsewhere)",
    )
    _add_logging(p)


def _add_restore(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "restore",
        help="rebuild a database from a replica",
        description="Restore a database from a replica, as of the newest transaction, "
        "--txid or --timestamp. SOURCE is a database path or name from the config (-c), "
        "or a replica URL. The result is written to OUT.tmp, checked, and moved to OUT atomically.",
    )
    _add_source(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the database")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--txid", type=int, help="restore the state right after this transaction")
    target.add_argument(
        "--timestamp",
        metavar="RFC3339",
        help="restore the last transaction committed at or before this moment, e.g. "
        "2026-11-24T01:30:00Z or 2026-11-24T02:30:00+01:00",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (objects, bytes, TXID range) as JSON without downloading",
    )
    p.add_argument(
        "--if-replica-exists",
        action="store_true",
        help="exit 0 without restoring when the replica holds nothing (first deployment)",
    )
    p.add_argument(
        "--if-db-not-exists",
        action="store_true",
        help="exit 0 without restoring when OUT already exists (init containers)",
    )
    p.add_argument(
        "--integrity-check",
        choices=INTEGRITY_MODES,
        default="auto",
        help="check run on the result before it is moved into place (default: auto, a full "
        "integrity_check only when the checksum chain cannot prove the result: format v1)",
    )
    p.add_argument(
        "--max-shortfall",
        type=float,
        metavar="SECONDS",
        help="with --timestamp: fail, before downloading, if the newest state at or before "
        "the moment was committed more than SECONDS before it (default: restore it and warn "
        "when that is more than twice the sync interval)",
    )
    _add_logging(p)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `replicad` command."""
    args = build_parser().parse_args(argv)
    configure_logging(level=args.log_level or "info", fmt=args.log_format or "auto")
    try:
        return _COMMANDS[args.command](args)
    except ReplicadError as exc:
        print(f"replicad: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"replicad: hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


# -- replicate -------------------------------------------------------------------------------


def _replicate(args: argparse.Namespace) -> int:
    config = _replicate_config(args)
    configure_logging(
        level=args.log_level or config.log_level, fmt=args.log_format or config.log_format
    )
    return asyncio.run(
        _serve(config, args.metrics_addr or config.metrics_addr, takeover=args.takeover)
    )


def _exec(args: argparse.Namespace) -> int:
    words = list(args.words)
    if "--" not in words or words.index("--") == len(words) - 1:
        raise ConfigError(
            "exec needs the application's command after --",
            hint="replicad exec -c /etc/replicad.toml -- python app.py",
        )
    split = words.index("--")
    positional, command = words[:split], words[split + 1 :]
    if len(positional) not in (0, 2):
        raise ConfigError("before --, give either nothing (with -c) or DB_PATH REPLICA_URL")
    args.db_path, args.replica_url = positional if positional else (None, None)
    config = _replicate_config(args)
    configure_logging(
        level=args.log_level or config.log_level, fmt=args.log_format or config.log_format
    )
    return asyncio.run(
        _serve(
            config, args.metrics_addr or config.metrics_addr, child=command, takeover=args.takeover
        )
    )


def _replicate_config(args: argparse.Namespace) -> Config:
    if args.db_path and args.config:
        raise ConfigError("give either -c CONFIG or DB_PATH REPLICA_URL, not both")
    if args.db_path:
        if not args.replica_url:
            raise ConfigError(
                "the quick form needs both DB_PATH and REPLICA_URL",
                hint="replicad replicate app.db file:///var/backups/app",
            )
        return config_from_args(args.db_path, args.replica_url)
    return load_config(args.config or DEFAULT_CONFIG_PATH)


async def _serve(
    config: Config,
    metrics_addr: str | None,
    *,
    child: list[str] | None = None,
    takeover: bool = False,
) -> int:
    from replicad.daemon import Daemon, catch_early_signals  # noqa: PLC0415 - see the imports

    early_signals = catch_early_signals()
    clients: list[ReplicaClient] = []
    replicators = []
    try:
        for db_config in config.databases:
            replicators.append(await _replicator(db_config, clients, takeover=takeover))
    except BaseException:
        for client in clients:
            await client.close()
        raise
    log.info("starting", databases=[str(db.path) for db in config.databases])
    metrics = None
    if metrics_addr:
        host, port = parse_address(metrics_addr)
        metrics = MetricsServer(replicators, host=host, port=port, max_lag=config.ready_max_lag)
    daemon = Daemon(
        replicators,
        clients,
        shutdown_timeout=config.shutdown_timeout,
        metrics=metrics,
        child=child,
    )
    status = await daemon.serve(early_signals)
    return daemon.child_status if daemon.child_status is not None else status


async def _replicator(
    db_config: DatabaseConfig, clients: list[ReplicaClient], *, takeover: bool
) -> DatabaseReplicator:
    from replicad.db import Database  # noqa: PLC0415 - see the imports
    from replicad.lease import Lease  # noqa: PLC0415
    from replicad.replica import Replica  # noqa: PLC0415
    from replicad.replicator import DatabaseReplicator  # noqa: PLC0415

    db_log = structlog.get_logger().bind(db=db_config.name)
    replicas = []
    for replica_config in db_config.replicas:
        client = await make_client(replica_config, max_attempts=DAEMON_MAX_ATTEMPTS)
        clients.append(client)
        replica_log = db_log.bind(replica=replica_config.name)
        lease = None
        if client.supports_create_only:
            # The daemon holds this host's state lock for the database before it starts.
            lease = Lease(
                client,
                db=str(db_config.path),
                duration=replica_config.lease_duration,
                holds_local_lock=True,
                log=replica_log,
            )
        else:
            replica_log.warning(
                "fencing is off: this storage does not enforce conditional writes, so a second "
                "daemon writing the same prefix would not be refused",
                url=client.url,
            )
        replicas.append(
            Replica(
                replica_config.name,
                client,
                max_pending_bytes=replica_config.max_pending_bytes,
                retention=replica_config.retention,
                compaction_levels=replica_config.compaction_levels,
                spool_dir=db_config.state_dir,
                lease=lease,
                takeover=takeover,
                log=replica_log,
            )
        )
    return DatabaseReplicator(
        Database(db_config.path, spill_dir=db_config.state_dir),
        replicas,
        name=db_config.name,
        state_dir=db_config.state_dir,
        poll_interval=db_config.poll_interval,
        sync_interval=db_config.sync_interval,
        checkpoints=db_config.checkpoints,
        snapshot_interval=db_config.snapshot_interval,
        log=db_log,
    )


async def make_client(config: ReplicaConfig, *, max_attempts: int | None = None) -> ReplicaClient:
    """The storage client a replica's configuration describes (`max_attempts` per request:
    the S3 client's default when None)."""
    if config.path is not None:
        return FileReplicaClient(config.path)
    assert config.s3 is not None
    # Imported here: aiobotocore takes a while to import and file-only runs never need it.
    from replicad.clients.s3 import DEFAULT_MAX_ATTEMPTS, S3ReplicaClient  # noqa: PLC0415

    s3 = config.s3
    client = S3ReplicaClient(
        bucket=s3.bucket,
        prefix=s3.prefix,
        endpoint_url=s3.endpoint,
        region=s3.region,
        access_key_id=s3.access_key_id.reveal() if s3.access_key_id else None,
        secret_access_key=s3.secret_access_key.reveal() if s3.secret_access_key else None,
        session_token=s3.session_token.reveal() if s3.session_token else None,
        profile=s3.profile,
        path_style=s3.path_style,
        ca_bundle=s3.ca_bundle,
        verify_tls=s3.verify_tls,
        storage_class=s3.storage_class,
        part_size=s3.part_size,
        concurrency=s3.concurrency,
        conditional_writes=s3.conditional_writes,
        max_attempts=max_attempts or DEFAULT_MAX_ATTEMPTS,
    )
    await client.open()
    return client


# -- restore ---------------------------------------------------------------------------------


def _restore(args: argparse.Namespace) -> int:
    replica_config = _source_replica(args)
    if args.if_db_not_exists and args.output.exists():
        print(json.dumps({"skipped": f"{args.output} exists (--if-db-not-exists)"}))
        return 0
    result = asyncio.run(_run_restore(replica_config, args))
    if result is None:
        return 0
    print(
        json.dumps(
            {
                "restored": str(result.path),
                "txid": result.txid,
                "pages": result.db_pages,
                "page_size": result.page_size,
                "objects": result.objects,
                "bytes": result.bytes_downloaded,
                "seconds": round(result.seconds, 3),
                # The restored file's database checksum, proven equal to the source's at that
                # TXID; null for a format v1 replica, which records none (unproven).
                "checksum": None if result.checksum is None else f"{result.checksum:016x}",
                "proven": result.checksum is not None,
                "warnings": list(result.warnings),
                "integrity_check": result.integrity,
                **_landing_json(result.landing),
            }
        )
    )
    return 0


def _landing_json(landing: Landing | None) -> dict[str, object]:
    """Where a restore to a moment landed, for the JSON output (nothing for other targets)."""
    if landing is None:
        return {}
    return {
        "landing": {
            "target": iso_ns(landing.target_ns),
            "txid": landing.txid,
            "committed": iso_ns(landing.commit_ns),
            "shortfall_seconds": round(landing.shortfall_ns / 1e9, 3),
            "next_txid": landing.next_txid,
            "next_committed": None
            if landing.next_commit_ns is None
            else iso_ns(landing.next_commit_ns),
        }
    }


def _warn_shortfall(landing: Landing | None, sync_interval: float) -> None:
    """Say on stderr when a restore to a moment lands well before it (more than two sync
    intervals: the daemon was down, or nothing was captured then)."""
    if landing is None or landing.shortfall_ns <= 2 * sync_interval * 1e9:
        return
    after = (
        "no later state is kept"
        if landing.next_commit_ns is None
        else f"the next state is TXID {landing.next_txid}, committed at "
        f"{iso_ns(landing.next_commit_ns)}"
    )
    print(
        f"replicad: warning: the newest state at or before {iso_ns(landing.target_ns)} is TXID "
        f"{landing.txid}, committed at {iso_ns(landing.commit_ns)}, "
        f"{landing.shortfall_ns / 1e9:.3f} s before it; {after}",
        file=sys.stderr,
    )


def _sync_interval(args: argparse.Namespace) -> float:
    """The source database's sync interval (the default for a bare replica URL)."""
    if args.config is None:
        return DEFAULT_SYNC_INTERVAL
    return load_config(args.config).database(args.source).sync_interval


def _source_replica(args: argparse.Namespace) -> ReplicaConfig:
    if args.config is None:
        if "://" not in args.source:
            raise ConfigError(
                f"{args.source!r} is not a replica URL",
                hint="give a replica URL (file:///dir, s3://bucket/prefix), or -c CONFIG with "
                "the database's path or name",
            )
        return replica_from_url(args.source)
    db_config = load_config(args.config).database(args.source)
    if args.replica is None:
        return db_config.replicas[0]
    for replica in db_config.replicas:
        if replica.name == args.replica:
            return replica
    names = ", ".join(r.name for r in db_config.replicas)
    raise ConfigError(f"database {db_config.name} has no replica {args.replica!r} ({names})")


async def _run_restore(config: ReplicaConfig, args: argparse.Namespace) -> RestoreResult | None:
    at_ns = parse_timestamp(args.timestamp) if args.timestamp else None
    client = await make_client(config)
    try:
        if args.if_replica_exists and not await client.list_objects():
            print(json.dumps({"skipped": f"{client.url} holds nothing (--if-replica-exists)"}))
            return None
        max_shortfall = None if args.max_shortfall is None else round(args.max_shortfall * 1e9)
        if args.dry_run:
            plan = await make_plan(client, target_txid=args.txid, at_ns=at_ns)
            _warn_shortfall(plan.landing, _sync_interval(args))
            if plan.landing is not None and max_shortfall is not None:
                check_shortfall(plan.landing, max_shortfall)
            print(json.dumps(_plan_json(plan) | _landing_json(plan.landing), indent=2))
            return None
        result = await restore(
            client,
            args.output,
            target_txid=args.txid,
            at_ns=at_ns,
            force=args.force,
            integrity=args.integrity_check,
            max_shortfall_ns=max_shortfall,
        )
        _warn_shortfall(result.landing, _sync_interval(args))
        return result
    finally:
        await client.close()


def _plan_json(plan: RestorePlan) -> dict[str, object]:
    return {
        "target_txid": plan.target_txid,
        "bytes": plan.total_bytes,
        "objects": [
            {
                "key": name.key,
                "bytes": size,
                "first_txid": name.first_txid,
                "last_txid": name.last_txid,
            }
            for name, size in zip(plan.objects, plan.sizes, strict=True)
        ],
    }


# -- snapshot, ls, log -----------------------------------------------------------------------


def _snapshot(args: argparse.Namespace) -> int:
    from replicad.pidfile import running_daemon  # noqa: PLC0415 - see the imports

    if args.config:
        config = load_config(args.config)
        dbs = [config.database(args.db_path)] if args.db_path else list(config.databases)
    elif args.db_path:
        dbs = list(config_from_args(args.db_path, "file:///unused").databases)
    else:
        raise ConfigError("name a database (DB_PATH) or a configuration (-c CONFIG)")
    for db in dbs:
        pid = running_daemon(db.state_dir)
        if pid is None:
            raise ReplicadError(
                f"no replicad daemon is running for {db.path}",
                hint="snapshots are taken by the daemon: start `replicad replicate` (it takes "
                "one at start when a replica needs it)",
            )
        os.kill(pid, signal.SIGUSR1)
        print(json.dumps({"requested": str(db.path), "pid": pid}))
    return 0


def _ls(args: argparse.Namespace) -> int:
    from replicad.inspect import summarize  # noqa: PLC0415 - see the imports

    summary = asyncio.run(_with_client(_source_replica(args), summarize))
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
        return 0
    print(f"replica   {summary.url}")
    print(
        f"newest    TXID {summary.newest_txid} committed {summary.newest_commit} "
        f"({summary.age_seconds} s ago)"
    )
    print(f"objects   {summary.objects}, {summary.bytes} bytes")
    for level in summary.levels:
        print(
            f"  {level.kind:<8} L{level.level}  {level.objects:>6} objects {level.bytes:>12} bytes"
            f"  TXID {level.first_txid}..{level.last_txid}  {level.oldest} .. {level.newest}"
        )
    for snap in summary.snapshots:
        print(f"  snapshot TXID {snap['txid']} taken {snap['taken']} ({snap['bytes']} bytes)")
    return 0


def _log(args: argparse.Namespace) -> int:
    from replicad.inspect import transaction_log  # noqa: PLC0415 - see the imports

    since = parse_timestamp(args.since) if args.since else None
    until = parse_timestamp(args.until) if args.until else None

    async def run(client: ReplicaClient) -> list[LogEntry]:
        return await transaction_log(client, since_ns=since, until_ns=until)

    entries = asyncio.run(_with_client(_source_replica(args), run))
    for e in entries:
        if args.json:
            print(json.dumps(dataclasses.asdict(e)))
        else:
            print(f"{e.txid:>10}  {e.committed}  pages {e.pages:>6}  db_pages {e.db_pages}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from replicad.verify import VerifyReport, compare_live, verify_replica  # noqa: PLC0415

    async def run(client: ReplicaClient) -> VerifyReport:
        report = await verify_replica(client, target_txid=args.txid)
        if args.db is not None:
            report = await compare_live(report, args.db)
        return report

    report = asyncio.run(_with_client(_source_replica(args), run))
    if args.json:
        fields = dataclasses.asdict(report)
        fields["checksum"] = f"{report.checksum:016x}"
        if report.live_checksum is not None:
            fields["live_checksum"] = f"{report.live_checksum:016x}"
        print(json.dumps({**fields, "ok": report.ok}, indent=2))
    else:
        print(
            f"verified  {report.url} up to TXID {report.target_txid}: {report.objects} objects, "
            f"{report.bytes} bytes, {report.checks} checksums compared, "
            f"{report.seconds:.2f} s"
        )
        print(f"checksum  {report.checksum:016x}")
        if report.unproven:
            print(
                f"unproven  {len(report.unproven)} format v1 objects record no checksums: their "
                "place in the history is not proven (only their own CRCs were checked)"
            )
        for warning in report.warnings:
            print(f"warning   {warning}")
        if report.live_checksum is not None and report.ok:
            print(f"live      {args.db} has the same checksum")
        for problem in report.problems:
            print(f"FAILED    {problem}")
    return 0 if report.ok else 1


async def _with_client(config: ReplicaConfig, action: Callable[[ReplicaClient], Awaitable[T]]) -> T:
    client = await make_client(config)
    try:
        return await action(client)
    finally:
        await client.close()


def _config(args: argparse.Namespace) -> int:
    config = load_config(args.config or DEFAULT_CONFIG_PATH)
    print(json.dumps(_plain(config), indent=2))
    return 0


def _plain(value: object) -> object:
    """Configuration as JSON-ready data; secrets masked."""
    if isinstance(value, Secret):
        return "***"
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "replicate": _replicate,
    "exec": _exec,
    "config": _config,
    "restore": _restore,
    "snapshot": _snapshot,
    "ls": _ls,
    "status": _ls,
    "log": _log,
    "verify": _verify,
}
