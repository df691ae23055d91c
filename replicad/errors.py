"""The exception tree: every failure replicad expects is one of these.

    ReplicadError                 base; carries a message and a hint (what to do next)
    ├── ConfigError               the configuration file or command line is wrong
    ├── DatabaseError             the SQLite database cannot be replicated as it is
    │   └── SnapshotRetry         the WAL restarted while a snapshot read it: take it again
    ├── WalError                  the -wal header is unusable (a torn tail is *not* an error)
    ├── FormatError               an object in a replica is corrupt, truncated, foreign or too new
    │   └── ObjectLockedError     an encrypted object that no identity given can open
    ├── ReplicaError              an operation on a replica failed
    │   ├── ObjectNotFoundError   the key does not exist
    │   ├── ObjectExistsError     a create-only write found the key already there (another writer)
    │   ├── ReplicaAccessError    permanent: credentials, permissions, missing bucket or directory
    │   ├── ReplicaUnavailableError  transient: network, 5xx, throttling, timeouts; retry
    │   └── LeaseError            another daemon owns the replica prefix (or a corrupt lease
    │       │                     object hides who does): refused at start
    │       └── LeaseLostError    our lease was taken over while we ran: we stopped writing (exit 4)
    ├── RestoreError              a restore cannot produce a correct database
    │   └── HistoryForkError      objects of another history (a stale branch) block the target
    ├── StateError                replicad's own local state directory is full or unwritable
    └── ShutdownError             the final flush did not finish before its deadline

The CLI turns any of these into a message, the hint and an exit code; anything else is a bug
and keeps its traceback.  Messages never contain secrets: backends build them from the bucket,
endpoint and key only.
"""

from __future__ import annotations


class ReplicadError(Exception):
    """Base of every error replicad raises on purpose."""

    #: Exit code the CLI uses when this error ends a command.
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class ConfigError(ReplicadError):
    """The configuration (file, environment expansion or command line) is invalid."""

    exit_code = 2


class DatabaseError(ReplicadError):
    """The database cannot be replicated: missing, not SQLite, not in WAL mode, unreadable."""


class SnapshotRetry(DatabaseError):
    """The WAL restarted while a snapshot read it; take the snapshot again."""


class WalError(ReplicadError):
    """The -wal file's header is unusable. A torn or stale tail is the normal end of the log."""


class FormatError(ReplicadError):
    """An object read from a replica is corrupt, truncated, foreign or of an unknown version."""


class ObjectLockedError(FormatError):
    """An age-encrypted object, and no identity given (or none of those given) can open it."""


class ReplicaError(ReplicadError):
    """An operation on a replica failed."""

    #: The storage verb that failed (`PUT`, `GET`, `LIST`, `DELETE`, `HEAD`, `multipart`), set
    #: by the backend that raised it; None when unknown.
    operation: str | None = None

    @property
    def failed_write(self) -> bool:
        """Whether a write failed (so "cannot read replica" would mislead: a read-only mount or a
        read-only key).
        """
        return self.operation in _WRITE_OPERATIONS


_WRITE_OPERATIONS = frozenset({"PUT", "DELETE", "multipart"})


class ObjectNotFoundError(ReplicaError):
    """The requested key does not exist in the replica."""


class ObjectExistsError(ReplicaError):
    """A create-only write was refused because the key exists: another writer owns this prefix."""


class ReplicaAccessError(ReplicaError):
    """A permanent failure retrying cannot fix: credentials, permissions, missing bucket."""


class ReplicaUnavailableError(ReplicaError):
    """A transient failure: network error, server error, throttling, timeout. Retry later."""


class LeaseError(ReplicaError):
    """Another daemon owns this replica prefix or this database on this host (or a corrupt
    lease object hides who owns it): this daemon does not start.
    """


class LeaseLostError(LeaseError):
    """This daemon's lease was taken over while it ran: it stopped writing that replica.

    Its own exit code, so a supervisor can tell "another daemon owns the replica now" (do not
    restart this one blindly) from an unreachable replica (3).
    """

    exit_code = 4


class RestoreError(ReplicadError):
    """A restore cannot produce a correct database (target exists, no data, gap, bad check)."""


class HistoryForkError(RestoreError):
    """No chain reaches the target: where it stops, only objects of another history (their
    database checksums do not continue it) start.  The message names them.
    """


class StateError(ReplicadError):
    """replicad's local state directory (spool files, locks) cannot be written: full or denied."""


class ShutdownError(ReplicadError):
    """The final flush at shutdown did not ship everything before its deadline."""

    exit_code = 3
