"""Fencing: one daemon writes a replica prefix at a time, enforced by the storage itself.

The lease is a chain of small objects ``lease/<epoch:016x>``, each written create-only
(``If-None-Match: *``), so exactly one writer can create each epoch: acquiring or renewing the
lease is creating the next epoch, and a daemon that fails to (``ObjectExistsError``) has been
overtaken.  Each record names its owner (a random id per daemon run, host, pid, database) and
when it expires (wall clock, so other hosts can judge it).

* A daemon starting on a prefix whose newest lease is held by another owner and not expired is
  refused, loudly, with who holds it and until when.  `takeover=True` (``--takeover``) skips the
  expiry check, for when the operator knows the old host is gone.
* The holder checks before every upload that its lease is still valid by its own clock
  (``CLOCK_BOOTTIME``, which keeps counting while a machine is suspended), and renews it when a
  third of its life is left.  So a stale daemon (paused, partitioned) stops writing by itself no
  later than its lease expires, and its next renewal fails once another daemon took over.  Every
  object replicad writes is create-only too, so even a stale writer cannot overwrite anything.
* After taking over a lease that was not released (a crash, or ``--takeover`` of a daemon that
  may still be running), the new owner numbers its history 2**32 TXIDs above the newest it
  found (`txid_gap`).  Whatever the old daemon still ships before its next renewal fails lands
  below, as a dead branch of the old database's own consistent history; it can never be taken
  for a continuation of the new one (a restore of "latest" follows the new numbers).
* Renewal happens only on the way to an upload: an idle database still costs zero requests.
  The price: after `duration` of idleness the lease lapses and another daemon may take over
  without ``--takeover``; the first one then fails loudly at its next write.

On storage that does not enforce conditional writes (rclone serve s3), none of this can be
guaranteed; replicad warns once and replicates without fencing.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass

import structlog

from replicad.clients.base import ReplicaClient
from replicad.errors import ObjectExistsError, ReplicaError

LEASE_PREFIX = "lease/"
#: How long a lease lasts without renewal, in seconds.
DEFAULT_LEASE_DURATION = 120.0
#: How far above the newest TXID found a daemon that took over an unreleased lease numbers
#: its history, so nothing a stale writer ships can collide with or continue it.
TAKEOVER_TXID_GAP = 1 << 32
#: Lease epochs kept behind the current one (older ones are deleted when renewing).
_KEEP_EPOCHS = 2


class LeaseLostError(ReplicaError):
    """Another daemon owns this replica prefix (or our lease expired before we could renew)."""


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The content of one lease epoch."""

    epoch: int
    owner: str
    host: str
    pid: int
    db: str
    expires_at: float
    #: Written by a clean stop: nobody is writing, a successor may start at once.
    released: bool = False

    def describe(self) -> str:
        """Who holds it, for messages."""
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires_at))
        return f"{self.host} (pid {self.pid}, database {self.db}), lease until {until}"


def lease_key(epoch: int) -> str:
    """The key of lease epoch `epoch`."""
    return f"{LEASE_PREFIX}{epoch:016x}"


def is_lease_key(key: str) -> bool:
    """Whether a key belongs to the lease (not a foreign object)."""
    return key.startswith(LEASE_PREFIX)


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Lease:
    """This daemon's claim on one replica prefix."""

    def __init__(
        self,
        client: ReplicaClient,
        *,
        db: str,
        duration: float = DEFAULT_LEASE_DURATION,
        holds_local_lock: bool = False,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.client = client
        self.db = db
        self.duration = duration
        #: The caller holds this host's lock for `db` (pidfile.StateLock), so a lease this host
        #: took for the same database belongs to a daemon that is gone (a crash or SIGKILL).
        self.holds_local_lock = holds_local_lock
        self.owner = uuid.uuid4().hex
        self.log = log or structlog.get_logger()
        self.epoch = 0
        self._valid_until = 0.0
        self._lost: str | None = None
        #: TXIDs to skip for the first snapshot after taking over an unreleased lease.
        self.txid_gap = 0

    async def acquire(self, *, takeover: bool = False, keys: list[str] | None = None) -> None:
        """Claim the prefix. Raises `LeaseLostError` naming the holder if it is taken.

        `keys`: the lease keys from a listing the caller just made, to save another LIST.
        """
        newest = await self._newest(keys)
        held = newest is not None and newest.owner != self.owner
        if newest is not None and held and self._left_by_dead_local_daemon(newest):
            if not newest.released:  # a clean release needs no remark
                self.log.info(
                    "lease left by an earlier daemon on this host; claiming it", pid=newest.pid
                )
            held = False
        if newest is not None and held and not takeover and newest.expires_at > time.time():
            raise LeaseLostError(
                f"replica {self.client.url} is being written by {newest.describe()}",
                hint="stop that daemon first; if its host is gone, start this one with "
                "--takeover (or wait until the lease expires)",
            )
        if newest is not None and held and not newest.released:
            self.txid_gap = TAKEOVER_TXID_GAP
            self.log.warning("taking over the replica", previous=newest.describe())
        await self._claim((newest.epoch if newest else 0) + 1)

    def _left_by_dead_local_daemon(self, record: LeaseRecord) -> bool:
        return (
            self.holds_local_lock and record.host == socket.gethostname() and record.db == self.db
        )

    async def release(self) -> None:
        """At a clean stop: write an already expired epoch, so a successor need not wait."""
        if self._lost is not None or not self.epoch:
            return
        record = LeaseRecord(
            self.epoch + 1,
            self.owner,
            socket.gethostname(),
            os.getpid(),
            self.db,
            time.time(),
            released=True,
        )
        try:
            await self.client.put_object(
                lease_key(record.epoch), json.dumps(asdict(record)).encode(), create_only=True
            )
        except ReplicaError as exc:
            self.log.warning(
                "could not release the lease; a successor waits for it", error=str(exc)
            )
            return
        self.epoch = record.epoch
        self._valid_until = 0.0

    async def ensure(self) -> None:
        """Before an upload: fail if the lease is lost or expired; renew it when a third is left."""
        if self._lost is not None:
            raise LeaseLostError(self._lost)
        remaining = self._valid_until - _boottime()
        if remaining <= 0:
            # Expired while idle or unreachable: someone may have taken over since; claim anew.
            await self.acquire()
        elif remaining < self.duration / 3:
            await self._claim(self.epoch + 1)

    async def _claim(self, epoch: int) -> None:
        started = _boottime()
        record = LeaseRecord(
            epoch,
            self.owner,
            socket.gethostname(),
            os.getpid(),
            self.db,
            time.time() + self.duration,
        )
        try:
            await self.client.put_object(
                lease_key(epoch), json.dumps(asdict(record)).encode(), create_only=True
            )
        except ObjectExistsError as exc:
            holder = await self._newest()
            self._lost = (
                f"replica {self.client.url} was taken over by "
                f"{holder.describe() if holder else 'another daemon'}; this daemon stops writing it"
            )
            raise LeaseLostError(
                self._lost, hint="check which host should own this replica"
            ) from exc
        # Counted from before the request: the lease may have been visible to others that early.
        self._valid_until = started + self.duration
        self.epoch = epoch
        if epoch > _KEEP_EPOCHS + 1:
            await self.client.delete_objects([lease_key(epoch - _KEEP_EPOCHS - 1)])

    async def _newest(self, keys: list[str] | None = None) -> LeaseRecord | None:
        if keys is None:
            keys = [info.key for info in await self.client.list_objects(LEASE_PREFIX)]
        for key in sorted(keys, reverse=True):
            record = _parse(await self.client.get_object(key))
            if record is not None:
                return record
        return None


def _parse(data: bytes) -> LeaseRecord | None:
    try:
        raw = json.loads(data)
        return LeaseRecord(
            int(raw["epoch"]),
            str(raw["owner"]),
            str(raw["host"]),
            int(raw["pid"]),
            str(raw["db"]),
            float(raw["expires_at"]),
            bool(raw.get("released", False)),
        )
    except (ValueError, KeyError, TypeError):
        return None
