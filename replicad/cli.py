"""Command line: argument parsing and the wiring from configuration to objects.

This is the only module that knows both the configuration and the classes it configures.
Expected failures (`ReplicadError`) become one clear message with a hint and an exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
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
from replicad.observe import MetricsServer, bind_scope, configure_logging, parse_address
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
    from replicad.drill import Drill
    from replicad.find import FindStats, Query
    from replicad.inspect import LogEntry, LogStats
    from replicad.rekey import RekeyResult
    from replicad.replay import TxidRange
    from replicad.replica import Replica
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
    _add_find(sub)
    _add_rekey(sub)
    _add_promote(sub)
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
    _add_identity(p)
    _add_drill_options(p)
    _add_logging(p)


def _add_identity(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--age-identity-file",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="age identity file (AGE-SECRET-KEY-1... lines) or unencrypted OpenSSH private key "
        "that opens an encrypted replica; repeat for several (adds to age_identity_file)",
    )


def _add_rekey(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "rekey",
        help="re-encrypt a replica's history for new age recipients (key rotation)",
        description="Rewrite every object of the replica in place, a few at a time, "
        "encrypted for the --to recipients: decrypted with --age-identity-file (the old key; "
        "not needed for a plaintext replica, which this encrypts), checked, re-encrypted, "
        "replaced atomically, read back and compared. Safe to interrupt and run again: "
        "objects already encrypted for the new set are skipped. The daemon may keep running; "
        "give it the new age_recipients first. Prints one JSON line per object, then a summary.",
    )
    _add_source(p)
    _add_identity(p)
    p.add_argument(
        "--to",
        nargs="+",
        required=True,
        metavar="RECIPIENT",
        help="the new recipients: age1... keys or SSH public key lines (quote them)",
    )
    p.add_argument(
        "--spool-dir",
        type=Path,
        help="where objects pass through (0600 files; default: the system's temp directory)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=4,
        metavar="N",
        help="objects rewritten at once (default 4)",
    )
    _add_logging(p)


def _add_drill_options(p: argparse.ArgumentParser) -> None:
    drill = p.add_argument_group("drills")
    drill.add_argument(
        "--restore",
        action="store_true",
        help="also restore the state to a temporary file (checksum and integrity_check "
        "proven), then remove it",
    )
    drill.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="verify the history up to N random TXIDs of the retention window instead",
    )
    drill.add_argument(
        "--work-dir", type=Path, help="where a drill's temporary files go (default: TMPDIR)"
    )


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
    p.add_argument(
        "--pass-credentials",
        action="store_true",
        help="leave replicad's own storage credentials in CMD's environment (by default the "
        "AWS_* credential variables and every variable holding a configured secret are removed)",
    )
    p.add_argument("--no-standby", action="store_true", help="as for replicate")
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
            help="summarize what a replica holds"
            + (" (without SOURCE: one line per configured database)" if name == "status" else ""),
            description="Newest TXID and its commit time and age, snapshots, and objects and "
            "bytes per level, from one listing of the replica."
            + (
                " `status -c CONFIG` alone: one line per database of the configuration "
                "(directories included): newest TXID shipped, when, how long ago, and any error."
                if name == "status"
                else ""
            ),
        )
        if name == "status":
            p.add_argument("-c", "--config", type=Path, help="TOML configuration file")
            p.add_argument(
                "source", metavar="SOURCE", nargs="?", help="DB_PATH/name (with -c) or REPLICA_URL"
            )
            p.add_argument("--replica", help="which replica of the database (default: the first)")
        else:
            _add_source(p)
        _add_identity(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        _add_logging(p)


def _add_log(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "log",
        help="list transactions and what each did (to find the bad one)",
        description="TXID, commit time (when replicad saw the commit), pages and database "
        "size of each transaction in the range, and what it did: tables and indexes whose "
        "pages it wrote, schema changes (tables created, dropped, altered), pages freed, the "
        "database growing or shrinking. The state before the range is rebuilt once into a "
        "scratch copy (about the database's size on disk) and the transactions are replayed "
        "onto it; --brief reads only the segments' trailers instead. Prints what it read.",
    )
    _add_source(p)
    _add_replay_args(p)
    p.add_argument(
        "--brief",
        action="store_true",
        help="TXID, time, pages and size only, from the segments' trailers (ranged reads)",
    )
    _add_identity(p)
    p.add_argument("--json", action="store_true", help="print JSON lines")
    _add_logging(p)


def _add_find(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "find",
        help="find the transactions that changed a query's answer (which write deleted my rows?)",
        description="Rebuild the database as of the start of the range once, apply each "
        "transaction in turn to that scratch copy, and run the read-only query after each. "
        "Prints every transaction after which the answer changed: its TXID, commit time, the "
        "answer before and after, and the `replicad restore` command for the state just "
        "before it. The scratch copy needs about the database's size on disk.",
    )
    _add_source(p)
    p.add_argument(
        "--sql",
        required=True,
        metavar="QUERY",
        help='one read-only statement, e.g. "SELECT count(*) FROM invoices"',
    )
    _add_replay_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per change")
    _add_identity(p)
    _add_logging(p)


def _add_replay_args(p: argparse.ArgumentParser) -> None:
    """The range of transactions to replay, and where the scratch copy goes."""
    start = p.add_mutually_exclusive_group()
    start.add_argument("--since", metavar="RFC3339", help="first commit time to examine")
    start.add_argument("--from-txid", type=int, metavar="N", help="first TXID to examine")
    end = p.add_mutually_exclusive_group()
    end.add_argument("--until", metavar="RFC3339", help="last commit time to examine")
    end.add_argument("--to-txid", type=int, metavar="M", help="last TXID to examine")
    p.add_argument(
        "--scratch-dir",
        type=Path,
        help="where the scratch copy is written (default: the system's temporary directory)",
    )


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
        "everything committed and exit (status 0 only if all of it was shipped, 3 if not, 4 if "
        "another daemon took a replica over). Either "
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
        "--no-standby",
        action="store_true",
        help="exit with an error if another daemon replicates a database (on this host, or "
        "holding a replica's lease) instead of waiting for it as a standby (config: standby)",
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
    p.add_argument(
        "-o", "--output", type=Path, help="where to write the database (not with --dry-run)"
    )
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
        help="print the plan (target TXID and its commit time, objects, bytes) as JSON "
        "without downloading the objects",
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
    _add_identity(p)
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
    _add_follow_options(p)
    _add_logging(p)


def _add_follow_options(p: argparse.ArgumentParser) -> None:
    from replicad.follow import DEFAULT_FOLLOW_INTERVAL  # noqa: PLC0415 - see the imports

    group = p.add_argument_group("follow mode (a live read replica, or a warm standby)")
    group.add_argument(
        "--follow",
        action="store_true",
        help="after restoring, keep applying new objects (each proven by its checksums) until "
        "SIGTERM; readers may open OUT at any time and always see a committed state",
    )
    group.add_argument(
        "--follow-interval",
        type=float,
        default=DEFAULT_FOLLOW_INTERVAL,
        metavar="SECONDS",
        help=f"seconds between polls of the replica's tip (default {DEFAULT_FOLLOW_INTERVAL})",
    )
    group.add_argument(
        "--promote",
        action="store_true",
        help="with --follow: catch up once, then leave OUT for an application to write and exit",
    )


def main(
    argv: Sequence[str] | None = None, *, early_signals: list[signal.Signals] | None = None
) -> int:
    """Run one command.

    `early_signals`: when started by `replicad.launch`, its list of SIGTERM/SIGINT recorded
    since the process began; the daemon acts on them, any other command gets the default
    handling back (and dies of a signal already received, as it would have).
    """
    args = build_parser().parse_args(argv)
    if early_signals is not None and args.command not in _DAEMON_COMMANDS:
        _default_signals(early_signals)
    configure_logging(level=args.log_level or "info", fmt=args.log_format or "auto")
    args.early_signals = early_signals
    try:
        return _COMMANDS[args.command](args)
    except ReplicadError as exc:
        print(f"replicad: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"replicad: hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output stopped (`replicad log | head`): nothing went wrong here.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _default_signals(received: list[signal.Signals]) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in received[:1]:
        signal.raise_signal(sig)


# -- replicate -------------------------------------------------------------------------------


def _replicate(args: argparse.Namespace) -> int:
    config = _replicate_config(args)
    configure_logging(
        level=args.log_level or config.log_level, fmt=args.log_format or config.log_format
    )
    return asyncio.run(
        _serve(config, _daemon_options(args, config), early_signals=args.early_signals)
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _DaemonOptions:
    """What the daemon's command line adds to its configuration."""

    metrics_addr: str | None
    takeover: bool
    standby: bool


def _daemon_options(args: argparse.Namespace, config: Config) -> _DaemonOptions:
    return _DaemonOptions(
        metrics_addr=args.metrics_addr or config.metrics_addr,
        takeover=args.takeover,
        standby=config.standby and not args.no_standby,
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
    env = dict(os.environ)
    if not args.pass_credentials:
        env, removed = scrub_credentials(env, _configured_secrets(config))
        if removed:
            log.info(
                "removed replicad's credentials from the application's environment", names=removed
            )
    return asyncio.run(
        _serve(
            config,
            _daemon_options(args, config),
            child=command,
            child_env=env,
            early_signals=args.early_signals,
        )
    )


#: Variables botocore reads credentials from; the application gets its own if it needs any.
AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)


def scrub_credentials(
    environ: dict[str, str], secrets: set[str]
) -> tuple[dict[str, str], list[str]]:
    """`environ` without the AWS credential variables and without any variable whose value is
    one of `secrets` (how `${VAR}` handed a secret to the configuration); also the names
    removed, sorted (names only: they are not secret).
    """
    kept = {
        name: value
        for name, value in environ.items()
        if name not in AWS_CREDENTIAL_VARIABLES and value not in secrets
    }
    return kept, sorted(set(environ) - set(kept))


def _configured_secrets(config: Config) -> set[str]:
    found = set()
    for db in [*config.databases, *(d.template for d in config.directories)]:
        for replica in db.replicas:
            if replica.s3 is not None:
                for secret in (
                    replica.s3.access_key_id,
                    replica.s3.secret_access_key,
                    replica.s3.session_token,
                ):
                    if secret is not None:
                        found.add(secret.reveal())
    return found


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
    options: _DaemonOptions,
    *,
    child: list[str] | None = None,
    child_env: dict[str, str] | None = None,
    early_signals: list[signal.Signals] | None = None,
) -> int:
    from replicad.daemon import Daemon, catch_early_signals  # noqa: PLC0415 - see the imports

    early_signals = catch_early_signals(early_signals)
    clients: list[ReplicaClient] = []
    replicators = []
    try:
        for db_config in config.databases:
            replicators.append(await _replicator(db_config, clients, options))
    except BaseException:
        for client in clients:
            await client.close()
        raise
    log.info(
        "starting",
        databases=[str(db.path) for db in config.databases],
        directories=[
            f"{d.path}/{'**/' if d.recursive else ''}{d.pattern}" for d in config.directories
        ],
    )
    components = []
    if config.directories:
        from replicad.directory import DirectoryWatcher  # noqa: PLC0415 - see the imports

        async def factory(
            db_config: DatabaseConfig,
        ) -> tuple[DatabaseReplicator, list[ReplicaClient]]:
            opened: list[ReplicaClient] = []
            try:
                return await _replicator(db_config, opened, options), opened
            except BaseException:
                for client in opened:
                    await client.close()
                raise

        components.append(DirectoryWatcher(config.directories, factory))
    metrics = None
    if options.metrics_addr:
        host, port = parse_address(options.metrics_addr)
        metrics = MetricsServer(
            replicators,
            host=host,
            port=port,
            max_lag=config.ready_max_lag,
            max_verify_age=config.ready_max_verify_age,
            max_databases=config.metrics_max_databases,
        )
    daemon = Daemon(
        replicators,
        clients,
        shutdown_timeout=config.shutdown_timeout,
        metrics=metrics,
        child=child,
        child_env=child_env,
        standby=options.standby,
        components=components,
    )
    status = await daemon.serve(early_signals)
    return daemon.child_status if daemon.child_status is not None else status


async def _replicator(
    db_config: DatabaseConfig, clients: list[ReplicaClient], options: _DaemonOptions
) -> DatabaseReplicator:
    from replicad.db import Database  # noqa: PLC0415 - see the imports
    from replicad.lease import Lease  # noqa: PLC0415
    from replicad.replica import Replica  # noqa: PLC0415
    from replicad.replicator import DatabaseReplicator  # noqa: PLC0415

    db_log = structlog.get_logger().bind(db=db_config.name)
    replicas = []
    for replica_config in db_config.replicas:
        client = await make_client(
            replica_config, max_attempts=DAEMON_MAX_ATTEMPTS, spool_dir=db_config.state_dir
        )
        clients.append(client)
        replica_log = db_log.bind(replica=replica_config.name)
        compaction_levels = replica_config.compaction_levels
        if replica_config.age_recipients and not replica_config.age_identity_file:
            # Compaction reads objects back; this host holds no key that can (by design).
            compaction_levels = ()
            replica_log.info(
                "age encryption on and no identity on this host: compaction is off, and a "
                "restart takes a snapshot (see docs/security.md)"
            )
        lease = None
        if client.supports_create_only:
            # The daemon holds this host's lock for the database before it starts.
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
                compaction_levels=compaction_levels,
                follow_tip=replica_config.follow_tip,
                spool_dir=db_config.state_dir,
                lease=lease,
                takeover=options.takeover,
                standby=options.standby,
                log=replica_log,
            )
        )
    replicator = DatabaseReplicator(
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
    replicator.drills = _drills(db_config, replicas)
    return replicator


def _drills(db_config: DatabaseConfig, replicas: list[Replica]) -> list[Drill]:
    """Restore drills of each replica when `verify_interval` turns them on."""
    from replicad.drill import Drill  # noqa: PLC0415 - see the imports

    if not db_config.verify_interval:
        return []
    return [
        Drill(r, interval=db_config.verify_interval, spill_dir=db_config.state_dir, log=r.log)
        for r in replicas
    ]


async def make_client(
    config: ReplicaConfig,
    *,
    max_attempts: int | None = None,
    identity_files: Sequence[Path] = (),
    spool_dir: Path | None = None,
) -> ReplicaClient:
    """The storage client a replica's configuration describes (`max_attempts` per request:
    the S3 client's default when None), behind age encryption (`CryptClient`): it encrypts for
    the replica's `age_recipients` and decrypts with its `age_identity_file` and
    `identity_files`; with neither it refuses encrypted objects with a clear error.
    """
    from replicad.clients.crypt import (  # noqa: PLC0415 - pyrage only when a client is made
        CryptClient,
        load_identities,
        parse_recipient,
    )

    files = [config.age_identity_file] if config.age_identity_file else []
    identities = [i for path in [*files, *identity_files] for i in load_identities(path)]
    inner = await _storage_client(config, max_attempts=max_attempts)
    return CryptClient(
        inner,
        recipients=[parse_recipient(r) for r in config.age_recipients],
        identities=identities,
        spool_dir=spool_dir,
    )


async def _storage_client(config: ReplicaConfig, *, max_attempts: int | None) -> ReplicaClient:
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
    if args.follow or args.promote:
        return _follow(replica_config, args)
    if args.output is None and not args.dry_run:
        raise ConfigError(
            "restore needs -o OUT: where to write the restored database",
            hint="restore beside the live database, e.g. -o /var/lib/app/restored.db",
        )
    if args.if_db_not_exists and args.output is not None and args.output.exists():
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
    intervals: the daemon was down, or nothing was captured then).
    """
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
    client = await make_client(config, identity_files=args.age_identity_file)
    try:
        if args.if_replica_exists and not await client.list_objects():
            print(json.dumps({"skipped": f"{client.url} holds nothing (--if-replica-exists)"}))
            return None
        max_shortfall = None if args.max_shortfall is None else round(args.max_shortfall * 1e9)
        if args.dry_run:
            from replicad.inspect import commit_time_ns, iso_ns  # noqa: PLC0415

            plan = await make_plan(client, target_txid=args.txid, at_ns=at_ns)
            committed = iso_ns(await commit_time_ns(client, plan))
            _warn_shortfall(plan.landing, _sync_interval(args))
            if plan.landing is not None and max_shortfall is not None:
                check_shortfall(plan.landing, max_shortfall)
            plan_json = {"target_committed": committed, **_plan_json(plan)}
            print(json.dumps(plan_json | _landing_json(plan.landing), indent=2))
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


# -- follow mode ---------------------------------------------------------------------------


def _add_promote(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "promote",
        help="stop a follower and leave its database for an application to write",
        description="Tell the follower writing OUT (restore --follow) to catch up once and stop, "
        "and wait for it; OUT is then checkpointed and never followed again. With no follower "
        "running, finish OUT the same way.",
    )
    p.add_argument("output", type=Path, metavar="OUT", help="the follower's database")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    _add_logging(p)


def _follow(config: ReplicaConfig, args: argparse.Namespace) -> int:
    if not args.follow:
        raise ConfigError("--promote is a follow-mode option", hint="add --follow")
    if args.txid is not None or args.timestamp or args.dry_run:
        raise ConfigError("--follow restores the newest state: drop --txid/--timestamp/--dry-run")
    if args.follow_interval <= 0:
        raise ConfigError(f"--follow-interval must be positive, got {args.follow_interval}")
    return asyncio.run(_run_follow(config, args))


async def _run_follow(config: ReplicaConfig, args: argparse.Namespace) -> int:
    from replicad.follow import Follower  # noqa: PLC0415 - see the imports

    stop = asyncio.Event()
    promote = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _set_both, promote, stop)
    if args.promote:
        promote.set()
        stop.set()
    client = await make_client(config)
    follower = Follower(
        client,
        args.output,
        interval=args.follow_interval,
        force=args.force,
        integrity=args.integrity_check,
    )
    try:
        if not await follower.wait_for_replica(stop):
            return 0
        await follower.start()
        await follower.run(stop)
        if promote.is_set():
            await follower.step()  # the newest state at the moment of promotion
            await follower.promote()
    finally:
        await follower.close()
        await client.close()
    print(
        json.dumps(
            {
                "followed": str(args.output),
                "txid": follower.txid,
                "promoted": promote.is_set(),
                # Requests this run made, by operation (LIST stays 0 in steady state).
                "requests": dict(client.stats.requests),
            }
        )
    )
    return 0


def _set_both(first: asyncio.Event, second: asyncio.Event) -> None:
    first.set()
    second.set()


def _promote(args: argparse.Namespace) -> int:
    from replicad.follow import promote_output  # noqa: PLC0415 - see the imports

    txid = promote_output(args.output, timeout=args.timeout)
    print(json.dumps({"promoted": str(args.output), "txid": txid}))
    return 0


# -- snapshot, ls, log -----------------------------------------------------------------------


def _snapshot(args: argparse.Namespace) -> int:
    from replicad.pidfile import signalable_daemon  # noqa: PLC0415 - see the imports

    if args.config:
        config = load_config(args.config)
        dbs = [config.database(args.db_path)] if args.db_path else list(config.databases)
    elif args.db_path:
        dbs = list(config_from_args(args.db_path, "file:///unused").databases)
    else:
        raise ConfigError("name a database (DB_PATH) or a configuration (-c CONFIG)")
    for db in dbs:
        pid = signalable_daemon(db.state_dir)
        if pid is None:
            raise ReplicadError(
                f"no replicad daemon is running for {db.path}",
                hint="snapshots are taken by the daemon: start `replicad replicate` (it takes "
                "one at start when a replica needs it)",
            )
        os.kill(pid, signal.SIGUSR1)
        print(json.dumps({"requested": str(db.path), "pid": pid}))
    return 0


#: Replicas listed at once by `replicad status -c CONFIG`.
STATUS_CONCURRENCY = 16


def _status(args: argparse.Namespace) -> int:
    if args.source is not None:
        return _ls(args)
    config = load_config(args.config or DEFAULT_CONFIG_PATH)
    databases = list(config.databases)
    if config.directories:
        from replicad.directory import matching_files  # noqa: PLC0415

        databases += [
            d.database(path) for path, d in sorted(matching_files(config.directories).items())
        ]
    rows = asyncio.run(_status_rows(databases, args.age_identity_file))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'DATABASE':<32} {'TXID':>8}  {'LAST COMMIT SHIPPED':<24} {'AGE s':>9}  ERROR")
    for row in rows:
        age = "-" if row["age_seconds"] is None else f"{row['age_seconds']:.1f}"
        print(
            f"{row['db']!s:<32} {row['txid'] or '-'!s:>8}  {row['committed'] or '-'!s:<24} "
            f"{age:>9}  {row['error'] or ''}"
        )
    return 0


async def _status_rows(
    databases: list[DatabaseConfig], identity_files: Sequence[Path]
) -> list[dict[str, object]]:
    """One summary per database's first replica, a few listings at a time."""
    from replicad.inspect import summarize  # noqa: PLC0415 - see the imports

    gate = asyncio.Semaphore(STATUS_CONCURRENCY)

    async def row(db: DatabaseConfig) -> dict[str, object]:
        replica = db.replicas[0]
        out: dict[str, object] = {
            "db": db.name,
            "path": str(db.path),
            "replica": replica.url,
            "txid": None,
            "committed": None,
            "age_seconds": None,
            "error": None,
        }
        async with gate:
            try:
                summary = await _with_client(replica, summarize, identity_files)
            except ReplicadError as exc:
                out["error"] = exc.message
                return out
        out.update(
            txid=summary.newest_txid,
            committed=summary.newest_commit,
            age_seconds=summary.age_seconds,
        )
        return out

    return list(await asyncio.gather(*(row(db) for db in databases)))


def _ls(args: argparse.Namespace) -> int:
    from replicad.inspect import summarize  # noqa: PLC0415 - see the imports

    summary = asyncio.run(_with_client(_source_replica(args), summarize, args.age_identity_file))
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
    from replicad.inspect import LogStats  # noqa: PLC0415 - see the imports

    if args.brief and (args.from_txid is not None or args.to_txid is not None):
        raise ConfigError("--brief selects by commit time only: use --since/--until")
    stats = LogStats()

    async def run(client: ReplicaClient) -> None:
        async with contextlib.aclosing(_log_entries(client, args, stats)) as entries:
            async for entry in entries:
                if args.json:
                    print(json.dumps(entry.as_dict()), flush=True)
                else:
                    print(_log_line(entry), flush=True)

    asyncio.run(_with_client(_source_replica(args), run, args.age_identity_file))
    per_txn = stats.bytes // stats.transactions if stats.transactions else 0
    base = f"{stats.base_bytes} bytes for the state before them and " if not args.brief else ""
    print(
        f"replicad: {stats.transactions} transactions; read {base}{stats.bytes} bytes for the "
        f"transactions ({per_txn} per transaction)",
        file=sys.stderr,
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from replicad.verify import (  # noqa: PLC0415 - see the imports
        VerifyReport,
        compare_live,
        drill_restore,
        verify_replica,
    )

    if args.sample is not None:
        return _verify_sample(args)

    async def run(client: ReplicaClient) -> VerifyReport:
        if args.restore:
            report = await drill_restore(client, target_txid=args.txid, work_dir=args.work_dir)
        else:
            report = await verify_replica(client, target_txid=args.txid, spill_dir=args.work_dir)
        if args.db is not None:
            report = await compare_live(report, args.db)
        return report

    report = asyncio.run(_with_client(_source_replica(args), run, args.age_identity_file))
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
        if report.restored:
            print("restored  to a temporary file: checksum and integrity_check proven, removed")
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


async def _log_entries(
    client: ReplicaClient, args: argparse.Namespace, stats: LogStats
) -> AsyncGenerator[LogEntry, None]:
    from replicad.inspect import detailed_log, transaction_log  # noqa: PLC0415

    if args.brief:
        since = parse_timestamp(args.since) if args.since else None
        until = parse_timestamp(args.until) if args.until else None
        for entry in await transaction_log(client, since_ns=since, until_ns=until, stats=stats):
            yield entry
        return
    txids = await _resolve_range(client, args)
    log = detailed_log(client, txids, scratch_parent=args.scratch_dir, stats=stats)
    async with contextlib.aclosing(log) as entries:
        async for entry in entries:
            yield entry


def _log_line(e: LogEntry) -> str:
    line = f"{e.txid:>10}  {e.committed}  pages {e.pages:>6}  db_pages {e.db_pages}"
    if e.marks:
        line += "  " + "  ".join(e.marks)
    if e.touched:
        line += "  touched: " + ", ".join(f"{name} {n}" for name, n in e.touched.items())
    return line


def _find(args: argparse.Namespace) -> int:
    from replicad.find import FindStats, Query  # noqa: PLC0415 - see the imports

    replica = _source_replica(args)
    query, stats = Query(args.sql), FindStats()

    async def run(client: ReplicaClient) -> int:
        return await _print_changes(client, query, args, stats)

    changes = asyncio.run(_with_client(replica, run, args.age_identity_file))
    rate = stats.examined / stats.seconds if stats.seconds else 0.0
    print(
        f"replicad: examined {stats.examined} transactions, {changes} changed the answer, in "
        f"{stats.seconds:.1f} s ({rate:.0f} transactions/s; {stats.base_seconds:.1f} s of it "
        f"rebuilding the first state); read {stats.base_bytes + stats.step_bytes} bytes",
        file=sys.stderr,
    )
    return 0


async def _print_changes(
    client: ReplicaClient, query: Query, args: argparse.Namespace, stats: FindStats
) -> int:
    from replicad.find import answer_json, answer_text, find_changes  # noqa: PLC0415
    from replicad.inspect import iso_ns  # noqa: PLC0415

    txids = await _resolve_range(client, args)
    if not args.json:
        print(f"examining TXIDs {txids.base_txid + 1}..{txids.last_txid} of {client.url}")
    count = 0
    changes = find_changes(client, query, txids, scratch_parent=args.scratch_dir, stats=stats)
    async with contextlib.aclosing(changes) as found:
        async for change in found:
            count += 1
            command = _restore_command(args, change.restore_txid)
            if args.json:
                record = {
                    "txid": change.txid,
                    "time": iso_ns(change.commit_time_ns),
                    "before": answer_json(change.before),
                    "after": answer_json(change.after),
                    "restore_txid": change.restore_txid,
                    "restore_command": command,
                }
                print(json.dumps(record), flush=True)
            else:
                print(f"TXID {change.txid}  committed {iso_ns(change.commit_time_ns)}")
                print(f"  before: {answer_text(change.before)}")
                print(f"  after:  {answer_text(change.after)}")
                print(f"  state just before it: {command}", flush=True)
    return count


async def _resolve_range(client: ReplicaClient, args: argparse.Namespace) -> TxidRange:
    from replicad.replay import resolve_range  # noqa: PLC0415 - see the imports

    return await resolve_range(
        client,
        from_txid=args.from_txid,
        to_txid=args.to_txid,
        since_ns=parse_timestamp(args.since) if args.since else None,
        until_ns=parse_timestamp(args.until) if args.until else None,
    )


def _restore_command(args: argparse.Namespace, txid: int) -> str:
    """The restore command for the state after `txid`, from the same source as this one."""
    words = ["replicad", "restore", "--txid", str(txid), "-o", f"before-{txid + 1}.db"]
    if args.config is not None:
        words += ["-c", str(args.config)]
        if args.replica is not None:
            words += ["--replica", args.replica]
    words.append(args.source)
    return shlex.join(words)


def _verify_sample(args: argparse.Namespace) -> int:
    from replicad.verify import SampleResult, verify_sample  # noqa: PLC0415 - see the imports

    if args.sample < 1 or args.txid is not None or args.restore:
        raise ConfigError("--sample N takes a positive N, without --txid or --restore")

    async def run(client: ReplicaClient) -> list[SampleResult]:
        return await verify_sample(client, args.sample, spill_dir=args.work_dir)

    results = asyncio.run(_with_client(_source_replica(args), run, args.age_identity_file))
    failed = [r for r in results if r.error is not None]
    if args.json:
        rows = [
            {
                "txid": r.txid,
                "ok": r.error is None,
                "error": r.error,
                "checksum": None if r.report is None else f"{r.report.checksum:016x}",
            }
            for r in results
        ]
        print(json.dumps({"samples": rows, "ok": not failed}, indent=2))
    else:
        for r in results:
            state = "verified" if r.report is not None else "FAILED  "
            detail = f"checksum {r.report.checksum:016x}" if r.report is not None else r.error
            print(f"{state}  TXID {r.txid}: {detail}")
    return 1 if failed or not results else 0


async def _with_client(
    config: ReplicaConfig,
    action: Callable[[ReplicaClient], Awaitable[T]],
    identity_files: Sequence[Path] = (),
) -> T:
    client = await make_client(config, identity_files=identity_files)
    try:
        return await action(client)
    finally:
        await client.close()


def _rekey(args: argparse.Namespace) -> int:
    from replicad.clients.crypt import load_identities, parse_recipient  # noqa: PLC0415
    from replicad.rekey import Rekeyer  # noqa: PLC0415

    config = _source_replica(args)
    files = [config.age_identity_file] if config.age_identity_file else []
    identities = [i for path in [*files, *args.age_identity_file] for i in load_identities(path)]
    recipients = []
    for i, text in enumerate(args.to):
        try:
            recipients.append(parse_recipient(text))
        except ValueError as exc:
            raise ConfigError(f"--to recipient {i + 1}: {exc}") from None

    def progress(key: str, outcome: str) -> None:
        print(json.dumps({"key": key, "outcome": outcome}), flush=True)

    async def run() -> RekeyResult:
        client = await _storage_client(config, max_attempts=None)
        try:
            rekeyer = Rekeyer(
                client,
                identities=identities,
                recipients=recipients,
                spool_dir=args.spool_dir,
                concurrency=max(1, args.concurrency),
                on_object=progress,
            )
            return await rekeyer.run()
        finally:
            await client.close()

    result = asyncio.run(run())
    print(json.dumps(dataclasses.asdict(result)))
    if result.stragglers:
        raise ReplicadError(
            f"{len(result.stragglers)} objects are still not encrypted for the new recipients "
            f"(first: {result.stragglers[0]})",
            hint="a daemon is still writing for the old recipients: give it the new "
            "age_recipients, restart it, and run rekey again",
        )
    return 0


def _config(args: argparse.Namespace) -> int:
    config = load_config(args.config or DEFAULT_CONFIG_PATH)
    for note in _config_notes(config):
        print(f"replicad: {note}", file=sys.stderr)
    print(json.dumps(_plain(config), indent=2))
    return 0


def _config_notes(config: Config) -> list[str]:
    """What `config check` should point out in a configuration that is valid."""
    notes = []
    for i, db in enumerate(config.databases):
        if not db.path.exists():
            notes.append(
                f"warning: databases[{i}].path: {db.path} does not exist; replicad would wait "
                "for it to appear (relative paths are relative to the configuration file)"
            )
    for i, directory in enumerate(config.directories):
        from replicad.directory import matching_files  # noqa: PLC0415

        if not matching_files([directory]):
            notes.append(
                f"warning: directories[{i}]: nothing in {directory.path} matches "
                f"{directory.pattern!r} yet; databases are picked up as they appear"
            )
    if config.metrics_addr:
        host, port = parse_address(config.metrics_addr)
        notes.append(
            f"metrics_addr {config.metrics_addr!r} serves http://{host}:{port}/metrics to "
            f"{bind_scope(host)}"
        )
    return notes


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


_DAEMON_COMMANDS = frozenset({"replicate", "exec"})
_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "replicate": _replicate,
    "exec": _exec,
    "promote": _promote,
    "config": _config,
    "restore": _restore,
    "snapshot": _snapshot,
    "ls": _ls,
    "status": _status,
    "log": _log,
    "verify": _verify,
    "find": _find,
    "rekey": _rekey,
}
