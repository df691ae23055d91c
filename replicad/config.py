"""Configuration: a TOML file (or the command line's quick form) into frozen dataclasses.

Every message names the file and the key, e.g.
``/etc/replicad.toml: databases[0].replicas[1].acess_key_id: unknown key (did you mean
'access_key_id'?)``.  Unknown keys are errors, never ignored: a typo in a backup tool's config
must not silently fall back to a default.  String values may use ``${VAR}`` to read an
environment variable (an unset variable is an error; ``$${`` is a literal ``${``), which is how
secrets stay out of the file.  Secrets are wrapped in `Secret`, whose repr and str are masked.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import itertools
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from replicad.checkpoint import (
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_CHECKPOINT_PAGES,
    DEFAULT_CHECKPOINT_TIMEOUT,
    DEFAULT_TRUNCATE_PAGES,
    CheckpointPolicy,
)
from replicad.compaction import DEFAULT_LEVELS
from replicad.drill import DEFAULT_READY_MAX_VERIFY_AGE, DEFAULT_VERIFY_INTERVAL
from replicad.errors import ConfigError
from replicad.lease import DEFAULT_LEASE_DURATION
from replicad.observe import (
    DEFAULT_METRICS_MAX_DATABASES,
    DEFAULT_READY_MAX_LAG,
    parse_address,
)
from replicad.retention import DEFAULT_RETENTION

DEFAULT_CONFIG_PATH = Path("/etc/replicad.toml")
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_SYNC_INTERVAL = 1.0
DEFAULT_MAX_PENDING_BYTES = 256 << 20
DEFAULT_S3_PART_SIZE = 8 << 20
DEFAULT_S3_CONCURRENCY = 4
#: Largest duration any setting accepts (ten years): beyond it a value is a typo, and huge
#: floats overflow timers and integer conversions further down (busy timeouts, nanoseconds).
MAX_SECONDS = 10 * 365.25 * 86400
#: `checkpoint_timeout` becomes SQLite's busy timeout in milliseconds, a C int.
MAX_CHECKPOINT_TIMEOUT = 86400.0
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")

_VAR_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Secret:
    """A credential: masked in repr/str so it cannot leak into logs, errors or metrics."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The real value, for handing to the storage client and nothing else."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class S3Options:
    """Settings of an S3-compatible replica (AWS S3, Cloudflare R2, MinIO, ...)."""

    bucket: str
    prefix: str
    endpoint: str | None = None
    region: str | None = None
    path_style: bool = False
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    session_token: Secret | None = None
    profile: str | None = None
    ca_bundle: str | None = None
    verify_tls: bool = True
    storage_class: str | None = None
    part_size: int = DEFAULT_S3_PART_SIZE
    concurrency: int = DEFAULT_S3_CONCURRENCY
    conditional_writes: bool = True


def _default_snapshot_interval() -> float:
    """The replicator's default, imported only when a database is configured: the replicator
    pulls in the WAL reader and numpy, which a restore from a URL never needs.
    """
    from replicad.replicator import DEFAULT_SNAPSHOT_INTERVAL  # noqa: PLC0415

    return DEFAULT_SNAPSHOT_INTERVAL


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """One destination of a database."""

    name: str
    url: str
    #: Local directory for `file://` replicas.
    path: Path | None = None
    s3: S3Options | None = None
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    retention: float = DEFAULT_RETENTION
    #: Bucket widths (seconds) of compaction levels 1, 2, 3...; empty turns compaction off.
    compaction_levels: tuple[float, ...] = DEFAULT_LEVELS
    #: Seconds a fencing lease lasts without renewal (see lease.py).
    lease_duration: float = DEFAULT_LEASE_DURATION
    #: age public keys (`age1...`, `ssh-ed25519 ...`) new objects are encrypted for; empty:
    #: plaintext (see clients/crypt.py and docs/security.md).
    age_recipients: tuple[str, ...] = ()
    #: Private key file for reading this replica's encrypted objects (restore, log, ...).
    age_identity_file: Path | None = None
    #: Keep `tip.json` (the newest keys) for followers: one small PUT per upload step.
    follow_tip: bool = True


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """One database and where it is replicated."""

    path: Path
    name: str
    state_dir: Path
    replicas: tuple[ReplicaConfig, ...]
    poll_interval: float = DEFAULT_POLL_INTERVAL
    sync_interval: float = DEFAULT_SYNC_INTERVAL
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    snapshot_interval: float = field(default_factory=_default_snapshot_interval)
    #: Seconds between restore drills of each replica (drill.py); 0 turns them off.
    verify_interval: float = DEFAULT_VERIFY_INTERVAL


DEFAULT_DIRECTORY_PATTERN = "*.db"
#: A directory's databases are woken by its file events (directory.py); their poll is only the
#: backstop, and at a thousand databases a 1 s poll costs more CPU than everything else.
DEFAULT_DIRECTORY_POLL_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    """Every database in a directory whose name matches `pattern` (directory mode).

    `template` holds the settings each database gets; its replicas' locations are the
    directory's, and each database is replicated under `<location>/<relative path>`.
    """

    path: Path
    pattern: str
    recursive: bool
    template: DatabaseConfig

    def matches(self, path: Path) -> bool:
        """Whether `path` is one of this directory's databases (by name, not by content)."""
        try:
            rel = path.absolute().relative_to(self.path)
        except ValueError:
            return False
        if not rel.parts or any(part.startswith(".") for part in rel.parts):
            return False  # hidden files: our own state directories and lock files
        if len(rel.parts) > 1 and not self.recursive:
            return False
        return fnmatch.fnmatchcase(rel.name, self.pattern)

    def database(self, path: Path) -> DatabaseConfig:
        """The configuration of the database at `path`, one of this directory's."""
        path = path.absolute()
        rel = path.relative_to(self.path).as_posix()
        return dataclasses.replace(
            self.template,
            path=path,
            name=rel,
            state_dir=path.with_name(f".{path.name}-replicad"),
            replicas=tuple(_replica_under(r, rel) for r in self.template.replicas),
        )


def _replica_under(replica: ReplicaConfig, rel: str) -> ReplicaConfig:
    """`replica` moved down to `<its location>/<rel>`."""
    if replica.path is not None:
        path = replica.path / rel
        return dataclasses.replace(replica, path=path, url=path.as_uri())
    assert replica.s3 is not None
    prefix = f"{replica.s3.prefix}/{rel}".strip("/")
    s3 = dataclasses.replace(replica.s3, prefix=prefix)
    url = f"s3://{s3.bucket}/{prefix}"
    if s3.endpoint:
        url += f"?endpoint={s3.endpoint}"
    return dataclasses.replace(replica, s3=s3, url=url)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    databases: tuple[DatabaseConfig, ...]
    source: str = "<command line>"
    log_level: str = "info"
    log_format: str = "auto"
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    #: HOST:PORT of the metrics endpoint; None (the default) serves none.
    metrics_addr: str | None = None
    #: /readyz fails when a commit has waited longer than this (seconds) to reach a replica.
    ready_max_lag: float = DEFAULT_READY_MAX_LAG
    #: While another daemon replicates a database (its host lock, or a live lease on a
    #: replica), wait for it as a standby; False: exit with an error instead (--no-standby).
    standby: bool = True
    #: /readyz fails when no restore drill passed within this many seconds (0: not required).
    ready_max_verify_age: float = DEFAULT_READY_MAX_VERIFY_AGE
    #: Directory mode: every matching database in these directories (`[[directories]]`).
    directories: tuple[DirectoryConfig, ...] = ()
    #: Beyond this many databases, metrics carry totals instead of per-database series.
    metrics_max_databases: int = DEFAULT_METRICS_MAX_DATABASES

    def database(self, path_or_name: str) -> DatabaseConfig:
        """The database configured under this path or name, or a database of a configured
        directory by its path; ConfigError if none.
        """
        wanted = Path(path_or_name).absolute()
        for db in self.databases:
            if db.path == wanted or db.name == path_or_name:
                return db
        for directory in self.directories:
            if directory.matches(wanted):
                return directory.database(wanted)
        known = ", ".join(
            [str(db.path) for db in self.databases]
            + [f"{d.path}/{d.pattern}" for d in self.directories]
        )
        known = known or "none"
        raise ConfigError(
            f"{self.source}: no database {path_or_name!r} is configured (configured: {known})"
        )


# -- loading -------------------------------------------------------------------------------


def load_config(path: Path, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML configuration file. Raises `ConfigError`."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path}: configuration file not found",
            hint="pass -c PATH, or use the quick form: replicad replicate DB_PATH REPLICA_URL",
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    reader = _Reader(str(path), os.environ if env is None else env, base=path.absolute().parent)
    return reader.config(raw)


def config_from_args(
    db_path: str, replica_url: str, *, env: Mapping[str, str] | None = None
) -> Config:
    """The quick form: one database, one replica, every other setting at its default."""
    reader = _Reader("<command line>", os.environ if env is None else env)
    return reader.config({"databases": [{"path": db_path, "replicas": [{"url": replica_url}]}]})


def replica_from_url(url: str, *, env: Mapping[str, str] | None = None) -> ReplicaConfig:
    """A replica described by its URL alone (restore without a config file)."""
    reader = _Reader("<command line>", os.environ if env is None else env)
    return reader.replica({"url": url}, "replica", 0)


class _Reader:
    """Validates raw TOML data, tracking the file and key path for messages."""

    def __init__(self, source: str, env: Mapping[str, str], *, base: Path | None = None) -> None:
        self.source = source
        self.env = env
        #: Relative paths in a file are relative to the file's directory, so the meaning of a
        #: configuration does not depend on where the daemon was started from.  On the command
        #: line they are relative to the working directory, as usual.
        self.base = base or Path.cwd()

    def error(self, key: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}", hint=hint)

    def config(self, raw: dict[str, Any]) -> Config:
        t = _Table(self, raw, "", _TOP_KEYS)
        log_level = t.choice("log_level", LOG_LEVELS, "info")
        log_format = t.choice("log_format", LOG_FORMATS, "auto")
        shutdown_timeout = t.positive_float("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT)
        metrics_addr = t.optional("metrics_addr")
        if metrics_addr is not None:
            try:
                parse_address(metrics_addr)
            except ConfigError as exc:
                raise self.error("metrics_addr", exc.message, hint=exc.hint) from None
        ready_max_lag = t.positive_float("ready_max_lag", DEFAULT_READY_MAX_LAG)
        standby = t.boolean("standby", True)
        ready_max_verify_age = t.non_negative_float(
            "ready_max_verify_age", DEFAULT_READY_MAX_VERIFY_AGE
        )
        metrics_max_databases = t.non_negative_int(
            "metrics_max_databases", DEFAULT_METRICS_MAX_DATABASES
        )
        dirs = t.list_of_tables("directories")
        dbs = t.list_of_tables("databases", required=not dirs)
        if not dbs and not dirs:
            raise self.error(
                "databases",
                "at least one database is required",
                hint="add a [[databases]] table, or a [[directories]] table for directory mode",
            )
        databases = tuple(self.database(db, f"databases[{i}]") for i, db in enumerate(dbs))
        self._check_unique([db.path for db in databases], "databases", "path")
        directories = tuple(self.directory(d, f"directories[{i}]") for i, d in enumerate(dirs))
        self._check_unique([d.path for d in directories], "directories", "path")
        self._check_drills(databases, ready_max_verify_age)
        return Config(
            databases=databases,
            source=self.source,
            log_level=log_level,
            log_format=log_format,
            shutdown_timeout=shutdown_timeout,
            metrics_addr=metrics_addr,
            ready_max_lag=ready_max_lag,
            standby=standby,
            ready_max_verify_age=ready_max_verify_age,
            directories=directories,
            metrics_max_databases=metrics_max_databases,
        )

    def _check_drills(self, databases: tuple[DatabaseConfig, ...], max_age: float) -> None:
        """A readiness window on drills needs drills that run more often than it."""
        if not max_age:
            return
        for i, db in enumerate(databases):
            if not 0 < db.verify_interval < max_age:
                raise self.error(
                    f"databases[{i}].verify_interval",
                    f"ready_max_verify_age = {max_age:g} needs drills more often than that, "
                    f"but verify_interval is {db.verify_interval:g}",
                    hint="set verify_interval below ready_max_verify_age (e.g. a third of it), "
                    "or ready_max_verify_age = 0",
                )

    def directory(self, raw: dict[str, Any], where: str) -> DirectoryConfig:
        """A `[[directories]]` table: the directory must exist and be readable now (a typo or
        an unmounted volume is refused at start, not waited for).
        """
        t = _Table(self, raw, where, _DIR_KEYS)
        path = (self.base / Path(t.string("path", required=True))).absolute()
        pattern = t.string("pattern") or DEFAULT_DIRECTORY_PATTERN
        if "/" in pattern:
            raise self.error(
                f"{where}.pattern",
                f"must match file names, not paths: {pattern!r}",
                hint="set recursive = true to look in subdirectories",
            )
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise self.error(
                f"{where}.path",
                f"{path} {what}",
                hint="create or mount the directory first; replicad never creates it",
            )
        if not os.access(path, os.R_OK | os.X_OK):
            raise self.error(
                f"{where}.path",
                f"{path} is not readable by this user",
                hint="give the user replicad runs as read and search permission on it",
            )
        template_raw = {k: v for k, v in raw.items() if k not in ("pattern", "recursive")}
        template = self.database(template_raw, where, directory=True)
        if "poll_interval" not in raw:
            template = dataclasses.replace(template, poll_interval=DEFAULT_DIRECTORY_POLL_INTERVAL)
        return DirectoryConfig(
            path=path,
            pattern=pattern,
            recursive=t.boolean("recursive", False),
            template=template,
        )

    def database(
        self, raw: dict[str, Any], where: str, *, directory: bool = False
    ) -> DatabaseConfig:
        t = _Table(self, raw, where, _DIR_DB_KEYS if directory else _DB_KEYS)
        path = self.base / Path(t.string("path", required=True))
        replicas_raw = t.list_of_tables("replicas", required=True)
        if not replicas_raw:
            raise self.error(f"{where}.replicas", "at least one replica is required")
        replicas = tuple(
            self.replica(r, f"{where}.replicas[{i}]", i) for i, r in enumerate(replicas_raw)
        )
        self._check_unique([r.name for r in replicas], f"{where}.replicas", "name")
        state_dir = t.string("state_dir")
        return DatabaseConfig(
            path=path,
            name=t.string("name") or path.stem,
            state_dir=self.base / state_dir
            if state_dir
            else path.with_name(f".{path.name}-replicad"),
            replicas=replicas,
            poll_interval=t.positive_float("poll_interval", DEFAULT_POLL_INTERVAL),
            sync_interval=t.non_negative_float("sync_interval", DEFAULT_SYNC_INTERVAL),
            snapshot_interval=t.non_negative_float(
                "snapshot_interval", _default_snapshot_interval()
            ),
            verify_interval=t.non_negative_float("verify_interval", DEFAULT_VERIFY_INTERVAL),
            checkpoints=CheckpointPolicy(
                checkpoint_pages=t.non_negative_int("checkpoint_pages", DEFAULT_CHECKPOINT_PAGES),
                checkpoint_interval=t.positive_float(
                    "checkpoint_interval", DEFAULT_CHECKPOINT_INTERVAL
                ),
                truncate_pages=t.non_negative_int("truncate_pages", DEFAULT_TRUNCATE_PAGES),
                checkpoint_timeout=t.positive_float(
                    "checkpoint_timeout",
                    DEFAULT_CHECKPOINT_TIMEOUT,
                    maximum=MAX_CHECKPOINT_TIMEOUT,
                ),
            ),
        )

    def replica(self, raw: dict[str, Any], where: str, index: int) -> ReplicaConfig:
        url = _Table(self, raw, where, None).string("url", required=True)
        parts = urlsplit(url)
        if parts.scheme == "file":
            return self._file_replica(
                raw, where, index, url=url, host=parts.netloc, path=parts.path
            )
        if parts.scheme == "s3":
            return self._s3_replica(raw, where, index, url)
        raise self.error(
            f"{where}.url",
            f"unsupported replica URL {redact_url(url)!r}",
            hint="use file:///absolute/dir or s3://bucket/prefix",
        )

    def _file_replica(
        self, raw: dict[str, Any], where: str, index: int, *, url: str, host: str, path: str
    ) -> ReplicaConfig:
        t = _Table(self, raw, where, _COMMON_REPLICA_KEYS)
        if host not in ("", "localhost") or not path.startswith("/"):
            raise self.error(
                f"{where}.url",
                f"file URL must name an absolute local path, got {redact_url(url)!r}",
                hint="write file:///var/backups/app (three slashes)",
            )
        return ReplicaConfig(
            name=t.string("name") or f"file{index}",
            url=url,
            path=Path(unquote(path)),
            max_pending_bytes=t.positive_int("max_pending_bytes", DEFAULT_MAX_PENDING_BYTES),
            retention=t.positive_float("retention", DEFAULT_RETENTION),
            compaction_levels=t.levels("compaction_levels", DEFAULT_LEVELS),
            lease_duration=t.positive_float("lease_duration", DEFAULT_LEASE_DURATION),
            **t.age_settings(),
            follow_tip=t.boolean("follow_tip", True),
        )

    def _s3_replica(self, raw: dict[str, Any], where: str, index: int, url: str) -> ReplicaConfig:
        parts = urlsplit(url)
        if not parts.netloc:
            raise self.error(f"{where}.url", f"S3 URL has no bucket: {redact_url(url)!r}")
        _refuse_userinfo(self, f"{where}.url", url)
        merged = dict(raw)
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in _S3_URL_KEYS:
                raise self.error(
                    f"{where}.url",
                    f"unknown URL parameter {key!r}",
                    hint=f"allowed: {', '.join(sorted(_S3_URL_KEYS))}",
                )
            if key in merged:
                raise self.error(f"{where}.{key}", "set both in the URL and as a key; keep one")
            merged[key] = _url_value(value)
        t = _Table(self, merged, where, _COMMON_REPLICA_KEYS | _S3_KEYS)
        prefix = unquote(parts.path).strip("/")
        options = S3Options(
            bucket=parts.netloc,
            prefix=prefix,
            endpoint=t.optional("endpoint"),
            region=t.optional("region"),
            path_style=t.boolean("path_style", False),
            access_key_id=t.secret("access_key_id"),
            secret_access_key=t.secret("secret_access_key"),
            session_token=t.secret("session_token"),
            profile=t.optional("profile"),
            ca_bundle=t.optional("ca_bundle"),
            verify_tls=t.boolean("verify_tls", True),
            storage_class=t.optional("storage_class"),
            part_size=t.positive_int("part_size", DEFAULT_S3_PART_SIZE, minimum=5 << 20),
            concurrency=t.positive_int("concurrency", DEFAULT_S3_CONCURRENCY),
            conditional_writes=t.boolean("conditional_writes", True),
        )
        if options.endpoint:
            _refuse_userinfo(self, f"{where}.endpoint", options.endpoint)
        if (options.access_key_id is None) != (options.secret_access_key is None):
            raise self.error(where, "access_key_id and secret_access_key must be set together")
        display = urlsplit(url)._replace(query="").geturl()
        if options.endpoint:
            display += f"?endpoint={options.endpoint}"
        return ReplicaConfig(
            name=t.string("name") or f"s3{index}",
            url=display,
            s3=options,
            max_pending_bytes=t.positive_int("max_pending_bytes", DEFAULT_MAX_PENDING_BYTES),
            retention=t.positive_float("retention", DEFAULT_RETENTION),
            compaction_levels=t.levels("compaction_levels", DEFAULT_LEVELS),
            lease_duration=t.positive_float("lease_duration", DEFAULT_LEASE_DURATION),
            **t.age_settings(),
            follow_tip=t.boolean("follow_tip", True),
        )

    def expand(self, value: str, key: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$${":
                return "${"
            name = match.group(1)
            if name not in self.env:
                raise self.error(
                    key,
                    f"environment variable {name} is not set",
                    hint=f"export {name} before starting replicad, or set it in the unit/pod",
                )
            return self.env[name]

        return _VAR_RE.sub(substitute, value)

    def _check_unique(self, values: list[Any], where: str, what: str) -> None:
        seen = set()
        for value in values:
            if value in seen:
                raise self.error(where, f"duplicate {what} {str(value)!r}")
            seen.add(value)


class _Table:
    """One TOML table with typed getters; unknown keys are rejected on construction."""

    def __init__(
        self, reader: _Reader, raw: Any, where: str, allowed: frozenset[str] | None
    ) -> None:
        if not isinstance(raw, dict):
            raise reader.error(where or "(top level)", "expected a table")
        self.reader = reader
        self.raw = raw
        self.where = where
        if allowed is not None:
            for key in raw:
                if key not in allowed:
                    raise reader.error(self.key(key), "unknown key", hint=_hint(key, allowed))

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def _get(self, name: str, kind: type | tuple[type, ...], what: str) -> Any:
        value = self.raw.get(name)
        if value is None:
            return None
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.reader.error(self.key(name), f"expected {what}, got {value!r}")
        if not isinstance(value, kind):
            raise self.reader.error(self.key(name), f"expected {what}, got {value!r}")
        return value

    def string(self, name: str, *, required: bool = False) -> str:
        value = self._get(name, str, "a string")
        if value is None:
            if required:
                raise self.reader.error(self.key(name), "missing (required)")
            return ""
        return self.reader.expand(value, self.key(name))

    def optional(self, name: str) -> str | None:
        """A string that is None when absent or empty."""
        return self.string(name) or None

    def secret(self, name: str) -> Secret | None:
        """A credential; a value of the wrong type is described by its type, never shown."""
        value = self.raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, str)):
            raise self.reader.error(
                self.key(name),
                f"expected a string, got {_kind_of(value)} (not shown: it is a secret)",
                hint='quote it ("...") or read it from the environment: "${VARIABLE}"',
            )
        value = self.string(name)
        return Secret(value) if value else None

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name, bool, "true or false")
        return default if value is None else bool(value)

    def positive_float(self, name: str, default: float, *, maximum: float = MAX_SECONDS) -> float:
        value = self.non_negative_float(name, default, maximum=maximum)
        if value <= 0:
            raise self.reader.error(self.key(name), f"must be greater than 0, got {value}")
        return value

    def non_negative_float(
        self, name: str, default: float, *, maximum: float = MAX_SECONDS
    ) -> float:
        """A duration in seconds: finite (TOML's `nan` and `inf` are refused), at most `maximum`."""
        value = self._get(name, (int, float), "a number of seconds")
        if value is None:
            return default
        if not math.isfinite(value):
            raise self.reader.error(
                self.key(name), f"must be a finite number of seconds, got {value}"
            )
        if value < 0:
            raise self.reader.error(self.key(name), f"must not be negative, got {value}")
        if value > maximum:
            raise self.reader.error(
                self.key(name), f"must be at most {maximum:g} seconds, got {value:g}"
            )
        return float(value)

    def positive_int(self, name: str, default: int, *, minimum: int = 1) -> int:
        value = self._get(name, int, "an integer")
        if value is None:
            return default
        if value < minimum:
            raise self.reader.error(self.key(name), f"must be at least {minimum}, got {value}")
        return int(value)

    def age_settings(self) -> dict[str, Any]:
        """`age_recipients` (each one checked) and `age_identity_file`."""
        from replicad.clients.crypt import parse_recipient  # noqa: PLC0415 - pyrage on demand

        value = self.raw.get("age_recipients", [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.reader.error(
                self.key("age_recipients"), 'expected a list of public keys, e.g. ["age1..."]'
            )
        recipients = tuple(self.reader.expand(v, self.key("age_recipients")) for v in value)
        for i, recipient in enumerate(recipients):
            try:
                parse_recipient(recipient)
            except ValueError as exc:
                raise self.reader.error(f"{self.key('age_recipients')}[{i}]", str(exc)) from None
        identity = self.optional("age_identity_file")
        return {
            "age_recipients": recipients,
            "age_identity_file": Path(identity) if identity else None,
        }

    def levels(self, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
        """Increasing bucket widths, each a whole multiple of the one before."""
        value = self.raw.get(name)
        if value is None:
            return default
        if not isinstance(value, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= MAX_SECONDS
            for v in value
        ):
            raise self.reader.error(self.key(name), "expected a list of seconds, e.g. [30, 300]")
        widths = tuple(float(v) for v in value)
        for low, high in itertools.pairwise(widths):
            if high <= low or high % low:
                raise self.reader.error(
                    self.key(name), f"{high:g} is not a larger multiple of {low:g}"
                )
        return widths

    def non_negative_int(self, name: str, default: int) -> int:
        return self.positive_int(name, default, minimum=0)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(name) or default
        if value not in choices:
            raise self.reader.error(
                self.key(name), f"must be one of {', '.join(choices)}, got {value!r}"
            )
        return value

    def list_of_tables(self, name: str, *, required: bool = False) -> list[Any]:
        value = self.raw.get(name)
        if value is None:
            if required:
                raise self.reader.error(self.key(name), "missing (required)")
            return []
        if not isinstance(value, list):
            raise self.reader.error(self.key(name), "expected an array of tables ([[...]])")
        return value


def _hint(key: str, allowed: frozenset[str]) -> str:
    """What to do about an unknown key: where it belongs if it belongs elsewhere, else the
    closest accepted key, and always the keys accepted here.
    """
    accepted = f"keys accepted here: {', '.join(sorted(allowed))}"
    if key in _TOP_KEYS and allowed is not _TOP_KEYS:
        return (
            f"{key} is a top-level key: move it above the first [[databases]] (in TOML a key "
            f"belongs to the table header above it)"
        )
    if key == "replicas" and allowed is _TOP_KEYS:
        return "replicas belong to a database: write [[databases.replicas]] under its [[databases]]"
    if key in _S3_KEYS | _COMMON_REPLICA_KEYS and allowed is _DB_KEYS:
        return f"{key} belongs to a replica: put it under [[databases.replicas]]; {accepted}"
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f"did you mean {close[0]!r}? {accepted}" if close else accepted


def redact_url(url: str) -> str:
    """`url` with any password in its user information replaced by `***`, for messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    return parts._replace(netloc=f"{user}{':***' if colon else ''}@{host}").geturl()


def _refuse_userinfo(reader: _Reader, key: str, url: str) -> None:
    """A user name or password in a URL would be printed by `config check`, logs and errors,
    and S3 clients ignore it anyway: credentials belong in their own (masked) keys.
    """
    if "@" in urlsplit(url).netloc:
        raise reader.error(
            key,
            f"must not contain a user name or password: {redact_url(url)!r}",
            hint="set access_key_id and secret_access_key (from ${VARIABLES}) instead",
        )


def _kind_of(value: object) -> str:
    """A TOML value's type in words, for messages that must not show the value."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _url_value(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return value


_TOP_KEYS = frozenset(
    {
        "databases",
        "log_level",
        "log_format",
        "shutdown_timeout",
        "metrics_addr",
        "ready_max_lag",
        "standby",
        "ready_max_verify_age",
        "directories",
        "metrics_max_databases",
    }
)
_DB_KEYS = frozenset(
    {
        "path",
        "name",
        "state_dir",
        "replicas",
        "poll_interval",
        "sync_interval",
        "checkpoint_pages",
        "checkpoint_interval",
        "truncate_pages",
        "checkpoint_timeout",
        "snapshot_interval",
        "verify_interval",
    }
)
#: A directory's settings for each of its databases (name and state_dir are per database).
_DIR_DB_KEYS = (_DB_KEYS - {"name", "state_dir"}) | {"pattern", "recursive"}
_DIR_KEYS = _DIR_DB_KEYS
_COMMON_REPLICA_KEYS = frozenset(
    {
        "url",
        "name",
        "max_pending_bytes",
        "retention",
        "compaction_levels",
        "lease_duration",
        "age_recipients",
        "age_identity_file",
        "follow_tip",
    }
)
_S3_URL_KEYS = frozenset({"endpoint", "region", "path_style", "verify_tls", "storage_class"})
_S3_KEYS = _S3_URL_KEYS | frozenset(
    {
        "access_key_id",
        "secret_access_key",
        "session_token",
        "profile",
        "ca_bundle",
        "part_size",
        "concurrency",
        "conditional_writes",
    }
)
__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Config",
    "DatabaseConfig",
    "DirectoryConfig",
    "ReplicaConfig",
    "S3Options",
    "Secret",
    "config_from_args",
    "load_config",
    "redact_url",
    "replica_from_url",
]
