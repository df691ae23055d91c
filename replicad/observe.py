"""Logging set-up and the metrics endpoint.

Logs are structlog events: JSON when stderr is not a terminal or when asked for, human
key-value otherwise.  Components bind `db=` and `replica=` so every line says what it is about.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TextIO

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from replicad.checkpoint import MODES as CHECKPOINT_MODES
from replicad.clients.base import ERROR_KINDS
from replicad.errors import ConfigError

if TYPE_CHECKING:
    from aiohttp import web

    from replicad.replica import Replica
    from replicad.replicator import DatabaseReplicator


def configure_logging(
    *, level: str = "info", fmt: str = "auto", stream: TextIO | None = None
) -> None:
    """Configure structlog once, at start-up. `fmt` is auto, json or console."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


# -- metrics ---------------------------------------------------------------------------------


#: The `db` (and `replica`) label of the totals that replace per-database series beyond
#: `metrics_max_databases`.
ALL_DATABASES = "(all)"
#: Per-database series are exported for at most this many databases by default: beyond it a
#: scrape would carry tens of thousands of series (about 25 per database).
DEFAULT_METRICS_MAX_DATABASES = 1000


class ReplicadCollector(Collector):
    """Prometheus metrics read from the replicators' counters at scrape time.

    Reading at scrape time keeps the sync and upload paths free of metric bookkeeping; the
    counters themselves are plain integers on `ReplicatorStats` and `ClientStats`.  Beyond
    `max_databases` databases, every family carries one series of totals, labelled
    `db="(all)"`, instead of one per database: cardinality stays bounded, sums stay right
    (lag is the largest, the replica TXID the smallest).
    """

    def __init__(
        self,
        replicators: Sequence[DatabaseReplicator],
        *,
        max_databases: int = DEFAULT_METRICS_MAX_DATABASES,
    ) -> None:
        self.replicators = replicators
        self.max_databases = max_databases

    def collect(self) -> Iterator[Metric]:
        """One family per metric, labelled by database (and replica), or totals."""
        count = GaugeMetricFamily("replicad_databases", "Databases this daemon replicates")
        count.add_metric([], len(self.replicators))
        yield count
        yield from self._database_metrics()
        yield from self._replica_metrics()

    def _groups(self) -> list[tuple[str, list[DatabaseReplicator]]]:
        """Each database alone, or all of them under one label beyond `max_databases`."""
        if len(self.replicators) <= self.max_databases:
            return [(r.name, [r]) for r in self.replicators]
        return [(ALL_DATABASES, list(self.replicators))] if self.replicators else []

    def _database_metrics(self) -> Iterator[Metric]:
        families = {
            name: CounterMetricFamily(f"replicad_{name}", text, labels=["db"])
            for name, text in _DB_COUNTERS.items()
        }
        checkpoints = CounterMetricFamily(
            "replicad_checkpoints", "Checkpoints run by replicad", labels=["db", "mode"]
        )
        busy = CounterMetricFamily(
            "replicad_checkpoints_busy",
            "Checkpoints that could not finish because a reader held the WAL",
            labels=["db"],
        )
        seconds = CounterMetricFamily(
            "replicad_checkpoint_seconds", "Time spent in checkpoints", labels=["db"]
        )
        high = GaugeMetricFamily(
            "replicad_wal_high_water_bytes", "Largest -wal file size seen", labels=["db"]
        )
        wal = GaugeMetricFamily(
            "replicad_wal_size_bytes", "Size of the -wal file at the last sync", labels=["db"]
        )
        for label, group in self._groups():
            stats = [r.stats for r in group]
            for name, family in families.items():
                family.add_metric([label], sum(getattr(st, name) for st in stats))
            wal.add_metric([label], sum(st.wal_size for st in stats))
            high.add_metric([label], max(st.wal_high_water for st in stats))
            modes: dict[str, int] = {}
            for st in stats:
                for mode, n in _from_zero(st.checkpoints, CHECKPOINT_MODES).items():
                    modes[mode] = modes.get(mode, 0) + n
            for mode, n in modes.items():
                checkpoints.add_metric([label, mode], n)
            busy.add_metric([label], sum(st.checkpoints_busy for st in stats))
            seconds.add_metric([label], sum(st.checkpoint_seconds for st in stats))
        yield from families.values()
        yield from (wal, high, checkpoints, busy, seconds)

    def _replica_metrics(self) -> Iterator[Metric]:
        labels = ["db", "replica"]
        requests = CounterMetricFamily(
            "replicad_replica_requests",
            "Storage requests by operation",
            labels=[*labels, "operation"],
        )
        errors = CounterMetricFamily(
            "replicad_replica_errors", "Failed storage calls by kind", labels=[*labels, "kind"]
        )
        uploaded = CounterMetricFamily(
            "replicad_replica_uploaded_bytes", "Bytes uploaded", labels=labels
        )
        downloaded = CounterMetricFamily(
            "replicad_replica_downloaded_bytes", "Bytes downloaded", labels=labels
        )
        lag = GaugeMetricFamily(
            "replicad_replication_lag_seconds",
            "Age of the oldest commit not yet uploaded",
            labels=labels,
        )
        shipped = GaugeMetricFamily(
            "replicad_replica_txid", "Last TXID the replica holds", labels=labels
        )
        pending = GaugeMetricFamily(
            "replicad_replica_pending_bytes", "Captured bytes not yet uploaded", labels=labels
        )
        lease_lost = CounterMetricFamily(
            "replicad_lease_lost",
            "Times this daemon found its lease taken over and stopped writing the replica",
            labels=labels,
        )
        for label, group in self._groups():
            by_name: dict[str, list[Replica]] = {}
            for r in group:
                for replica in r.replicas:
                    name = replica.name if len(group) == 1 else ALL_DATABASES
                    by_name.setdefault(name, []).append(replica)
            for name, replicas in by_name.items():
                key = [label, name]
                ops: dict[str, int] = {}
                kinds: dict[str, int] = {}
                for replica in replicas:
                    stats = replica.client.stats
                    for op, n in _from_zero(stats.requests, _OPERATIONS).items():
                        ops[op] = ops.get(op, 0) + n
                    for kind, n in _from_zero(stats.errors, ERROR_KINDS).items():
                        kinds[kind] = kinds.get(kind, 0) + n
                for op, n in ops.items():
                    requests.add_metric([*key, op], n)
                for kind, n in kinds.items():
                    errors.add_metric([*key, kind], n)
                uploaded.add_metric(key, sum(x.client.stats.bytes_uploaded for x in replicas))
                downloaded.add_metric(key, sum(x.client.stats.bytes_downloaded for x in replicas))
                lag.add_metric(key, max(x.lag_seconds() for x in replicas))
                shipped.add_metric(key, min(x.shipped_txid for x in replicas))
                pending.add_metric(key, sum(x.pending_bytes for x in replicas))
                lease_lost.add_metric(key, sum(x.writer.lost_total for x in replicas))
        yield from (requests, errors, uploaded, downloaded, lag, shipped, pending, lease_lost)
        yield from self._drill_metrics()

    def _drill_metrics(self) -> Iterator[Metric]:
        labels = ["db", "replica"]
        success = GaugeMetricFamily(
            "replicad_verify_last_success_timestamp_seconds",
            "Unix time of the last restore drill that passed (0: none yet)",
            labels=labels,
        )
        failures = CounterMetricFamily(
            "replicad_verify_failures",
            "Restore drills that found the replica damaged or not the captured state",
            labels=labels,
        )
        runs = CounterMetricFamily("replicad_verify_runs", "Restore drills run", labels=labels)
        for r in self.replicators:
            for drill in r.drills:
                key = [r.name, drill.replica.name]
                success.add_metric(key, drill.last_success_time)
                failures.add_metric(key, drill.failures)
                runs.add_metric(key, drill.runs)
        if any(r.drills for r in self.replicators):
            yield from (success, failures, runs)


def _from_zero(counts: dict[str, int], known: Sequence[str]) -> dict[str, int]:
    """`counts` with every known label present, at 0 until it happens: a series that appears
    only after its first event breaks `rate()` and `increase()` over the moment it appears,
    and an alert on errors cannot tell "none yet" from "not exported".
    """
    return {**dict.fromkeys(known, 0), **counts}


#: Operations every backend performs (the rest appear when first used).
_OPERATIONS = ("PUT", "GET", "LIST", "DELETE")

_DB_COUNTERS = {
    "syncs": "Sync steps run",
    "sync_errors": "Sync steps that failed",
    "transactions": "SQLite commits captured from the WAL",
    "captured_bytes": "Page bytes captured from committed WAL frames",
    "snapshots": "Snapshots taken",
    "continuity_losses": "Times the WAL stopped continuing our position (a snapshot followed)",
}


#: /readyz fails when a commit has waited longer than this to reach a replica.
DEFAULT_READY_MAX_LAG = 10.0


def liveness(replicators: Sequence[DatabaseReplicator]) -> list[str]:
    """Problems that mean the process is stuck (empty when alive): a sync loop that stopped."""
    now = time.monotonic()
    problems = []
    for r in replicators:
        limit = max(10.0, 5 * r.poll_interval)
        if r.last_sync_monotonic and now - r.last_sync_monotonic > limit:
            problems.append(f"{r.name}: no sync for {now - r.last_sync_monotonic:.1f} s")
    return problems


def readiness(replicators: Sequence[DatabaseReplicator], max_lag: float) -> list[str]:
    """Problems that mean backups are behind (empty when ready)."""
    problems = []
    for r in replicators:
        if r.standby is not None:
            problems.append(f"{r.name}: {r.standby}")
        elif not r.last_sync_monotonic:
            problems.append(f"{r.name}: not started")
        for replica in r.replicas:
            if replica.fenced is not None:
                problems.append(f"{r.name} -> {replica.name}: lease lost: {replica.fenced}")
            if replica.lease is not None and replica.lease.waiting_for is not None:
                problems.append(
                    f"{r.name} -> {replica.name}: standby: waiting for {replica.lease.waiting_for}"
                )
            waiting = replica.unshipped_seconds()
            if waiting > max_lag:
                problems.append(
                    f"{r.name} -> {replica.name}: commits unshipped for {waiting:.1f} s"
                )
    return problems


def drill_readiness(replicators: Sequence[DatabaseReplicator], max_age: float) -> list[str]:
    """Problems that mean the backups are not proven restorable lately (empty when ready)."""
    problems = []
    for r in replicators:
        for drill in r.drills:
            if (problem := drill.readiness_problem(max_age)) is not None:
                problems.append(f"{r.name} -> {drill.replica.name}: {problem}")
    return problems


class MetricsServer:
    """HTTP endpoint on one address: `/metrics` (Prometheus), `/healthz` (the process is alive:
    its sync loops run) and `/readyz` (every commit reached every replica within `max_lag`).
    """

    def __init__(
        self,
        replicators: Sequence[DatabaseReplicator],
        *,
        host: str,
        port: int,
        max_lag: float = DEFAULT_READY_MAX_LAG,
        max_verify_age: float = 0.0,
        max_databases: int = DEFAULT_METRICS_MAX_DATABASES,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ReplicadCollector(replicators, max_databases=max_databases))
        self.replicators = replicators
        self.host = host
        self.port = port
        self.max_lag = max_lag
        self.max_verify_age = max_verify_age
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen; raises `ConfigError` if the address cannot be bound."""
        # Imported here: aiohttp's import costs a third of a second at every start-up.
        from aiohttp import web  # noqa: PLC0415

        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise ConfigError(
                f"cannot listen on {self.host}:{self.port} for metrics: {exc.strerror}",
                hint="choose another --metrics-addr or stop what is using that port",
            ) from exc
        structlog.get_logger().info(
            "serving metrics",
            url=f"http://{_url_host(self.host)}:{self.port}/metrics",
            reachable_from=bind_scope(self.host),
        )

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        return _status(liveness(self.replicators))

    async def _readyz(self, _request: web.Request) -> web.Response:
        problems = readiness(self.replicators, self.max_lag)
        if self.max_verify_age:
            problems += drill_readiness(self.replicators, self.max_verify_age)
        return _status(problems)

    async def _metrics(self, _request: web.Request) -> web.Response:
        from aiohttp import web  # noqa: PLC0415 - see MetricsServer.start

        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _status(problems: list[str]) -> web.Response:
    from aiohttp import web  # noqa: PLC0415 - see MetricsServer.start

    body = {"ok": not problems, "problems": problems}
    return web.json_response(body, status=503 if problems else 200)


def bind_scope(host: str) -> str:
    """Who can reach a server bound to `host`, in words (for `config check` and the log)."""
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return "this host only (loopback)"
    if host == "0.0.0.0":
        return "every IPv4 interface: other hosts can reach it"
    if host in ("::", ""):
        return "every interface: other hosts can reach it"
    return f"the interface with address {host}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_address(value: str) -> tuple[str, int]:
    """`HOST:PORT` (or `:PORT`, meaning 127.0.0.1) into its parts; ConfigError if malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics address {value!r} is not HOST:PORT", hint="e.g. 127.0.0.1:9090")
    return (host.strip("[]") or "127.0.0.1"), int(port)
