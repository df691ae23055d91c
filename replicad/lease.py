"""Fencing: one daemon writes a replica prefix at a time, enforced by the storage itself.

The lease is a chain of small objects ``lease/<epoch:016x>``, each written create-only
(``If-None-Match: *``), so exactly one writer can create each epoch: acquiring or renewing the
lease is creating the next epoch, and a daemon that fails to (``ObjectExistsError``) has been
overtaken.  Each record names its owner (a random id per daemon run, host, pid, database, the
host's boot id and the database file's device and inode) and how long it lasts.

Time is judged only on each daemon's own monotonic clock (``CLOCK_BOOTTIME``, which keeps
counting while a machine is suspended); no daemon ever compares another host's wall clock with
its own, so a host whose clock is wrong cannot take over a live lease.

* The holder counts its lease from the start of its own last successful claim write, checks it
  before every write (`FencedWriter`, fence.py) and renews it when a third of its life is left.
  Renewing is creating the next epoch: it succeeds only while the newest epoch is still ours, so
  a daemon whose lease lapsed (idle, paused, partitioned) either finds its own epoch still the
  newest and continues, or finds a newer one and has lost: it stops writing, for good.  After a
  lapse it LISTs the lease first: a successor's renewals delete old epochs, so the key above
  ours may be free again although newer ones exist.
* A newcomer that finds a live record of another owner waits as a standby (or, with
  ``--no-standby``, is refused, naming the holder).  It reads the next epoch's key about once a
  second (one GET, no LIST) and takes over when the holder writes a *released* epoch (a clean
  stop), or when it has seen no newer epoch for the holder's `duration` on its own clock (then
  one LIST confirms the holder's epoch is still the newest, for the same reason).  The
  holder's epoch was written before the newcomer first saw it, so the holder's lease ends before
  the newcomer's wait does, provided the two clocks run at the same *rate*: the remaining
  assumption, covered by a margin of `CLOCK_RATE_MARGIN` plus `LAPSE_MARGIN` seconds.
  ``--takeover`` skips the wait, for when the operator knows the old host is gone.
* A record left by an earlier daemon for the same database on the same host is claimed at once
  only when it proves that daemon is gone: we hold the database's host lock (pidfile.py), and
  the record's boot id and database identity (device, inode) are ours.  Pods of one node have
  different host names but share the kernel, so neither the host name nor the path proves it.
* After taking over a lease that was not released, the new owner numbers its history 2**32
  TXIDs above the newest it found (`txid_gap`).  Whatever the old daemon still ships before its
  next check fails lands below, as a dead branch of the old database's own consistent history.
* Renewal happens only on the way to a write: an idle database still costs zero requests.
* A corrupt or absurd record (not JSON, wrong types, an epoch that does not match its key, a
  non-finite or absurd time) is a `LeaseError` saying what to do; ``--takeover`` always works:
  it claims the epoch above the highest key, whatever that key holds.

On storage that does not enforce conditional writes (rclone serve s3), none of this can be
guaranteed; replicad warns once and replicates without fencing.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import structlog

from replicad.clients.base import ReplicaClient
from replicad.errors import (
    LeaseError,
    LeaseLostError,
    ObjectExistsError,
    ObjectNotFoundError,
    ReplicaError,
)

__all__ = ["Lease", "LeaseError", "LeaseLostError", "LeaseRecord", "StandbyStopped"]

LEASE_PREFIX = "lease/"
#: How long a lease lasts without renewal, in seconds.
DEFAULT_LEASE_DURATION = 120.0
#: How often a standby reads the next lease epoch's key.
DEFAULT_STANDBY_POLL = 1.0
#: A standby waits this much longer than the holder's duration (relative, then absolute) before
#: it treats a lease as lapsed: the two hosts' monotonic clocks may run at slightly different
#: rates (NTP keeps them within 500 ppm; 1 % is far beyond), and requests take time.
CLOCK_RATE_MARGIN = 0.01
LAPSE_MARGIN = 1.0
#: How far above the newest TXID found a daemon that took over an unreleased lease numbers
#: its history, so nothing a stale writer ships can collide with or continue it.
TAKEOVER_TXID_GAP = 1 << 32
#: Lease epochs kept behind the current one (older ones are deleted when renewing).
_KEEP_EPOCHS = 2
#: Epochs at or above this are absurd (a daemon renewing every second needs 10**11 years).
_MAX_EPOCH = 1 << 60
#: Longest duration a record may claim (a week), and the range of plausible wall-clock times.
_MAX_DURATION = 7 * 24 * 3600.0
_WALL_RANGE = (0.0, 1e11)
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class StandbyStopped(Exception):
    """A stop was requested while this daemon waited as a standby: it never wrote anything."""


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The content of one lease epoch."""

    epoch: int
    owner: str
    host: str
    pid: int
    db: str
    #: Informational only (the holder's wall clock): nobody compares it with their own clock.
    expires_at: float
    #: Written by a clean stop: nobody is writing, a successor may start at once.
    released: bool = False
    #: Seconds the holder's lease lasts from the start of this epoch's write.
    duration: float = DEFAULT_LEASE_DURATION
    boot_id: str = ""
    db_dev: int = -1
    db_ino: int = -1

    def describe(self) -> str:
        """Who holds it, for messages."""
        return f"{self.host} (pid {self.pid}, database {self.db}, lease epoch {self.epoch})"


def lease_key(epoch: int) -> str:
    """The key of lease epoch `epoch`."""
    return f"{LEASE_PREFIX}{epoch:016x}"


def is_lease_key(key: str) -> bool:
    """Whether a key belongs to the lease (not a foreign object)."""
    return key.startswith(LEASE_PREFIX)


def key_epoch(key: str) -> int | None:
    """The epoch a lease key names, or None for a key that is not one of ours."""
    tail = key[len(LEASE_PREFIX) :] if is_lease_key(key) else ""
    if len(tail) != 16 or any(c not in "0123456789abcdef" for c in tail):
        return None
    return int(tail, 16)


def boot_id() -> str:
    """This kernel's boot id: equal only for processes of one host since its last boot."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


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
        standby_poll: float = DEFAULT_STANDBY_POLL,
        clock: Callable[[], float] = _boottime,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.client = client
        self.db = db
        self.duration = duration
        #: The caller holds this host's lock for `db` (pidfile.DatabaseLock), so a lease this
        #: host took for the same database file since boot belongs to a daemon that is gone.
        self.holds_local_lock = holds_local_lock
        self.standby_poll = standby_poll
        #: Monotonic seconds; injectable so tests need not race real time.
        self.clock = clock
        self.owner = uuid.uuid4().hex
        self.log = log or structlog.get_logger()
        self.epoch = 0
        self._valid_until = 0.0
        self._lost: str | None = None
        #: The epoch of a claim whose request failed (it may have landed) and when it started.
        self._attempt: tuple[int, float] | None = None
        #: Whom a standby waits for (None when not waiting), for /readyz.
        self.waiting_for: str | None = None
        self._stop_waiting = asyncio.Event()
        #: TXIDs to skip for the first snapshot after taking over an unreleased lease.
        self.txid_gap = 0

    @property
    def lost(self) -> str | None:
        """Why this daemon may no longer write the replica (None while it holds the lease)."""
        return self._lost

    async def acquire(
        self, *, takeover: bool = False, standby: bool = False, keys: list[str] | None = None
    ) -> bool:
        """Claim the prefix; returns whether it had to wait (the caller's listing is stale).

        If another owner holds a live lease: with `standby`, wait until it is released or has
        lapsed (`stop_waiting` ends the wait with `StandbyStopped`); otherwise raise
        `LeaseError` naming the holder.  A corrupt newest record raises `LeaseError` unless
        `takeover`.  `keys`: the lease keys from a listing the caller just made.
        """
        if keys is None:
            keys = [info.key for info in await self.client.list_objects(LEASE_PREFIX)]
        if takeover:
            await self._take_over(keys)
            return False
        newest = await self._newest(keys)
        waited = False
        while True:
            gap = False
            if newest is not None and not self._claimable(newest):
                if not standby:
                    raise LeaseError(
                        f"replica {self.client.url} is being written by {newest.describe()}",
                        hint="stop that daemon first, or start this one without --no-standby "
                        "to wait for it; if its host is gone, start this one with --takeover",
                    )
                newest = await self._wait_as_standby(newest)
                waited = True
                gap = not newest.released
            epoch = (newest.epoch if newest is not None else 0) + 1
            if await self._try_claim(epoch, gap=gap):
                return waited
            # Someone else claimed it first: that is the holder now.
            newest = await self._read_epoch(epoch) or await self._newest()

    def _claimable(self, record: LeaseRecord) -> bool:
        if record.released:
            return True
        if self._left_by_dead_local_daemon(record):
            self.log.info(
                "lease left by an earlier daemon for this database on this host; claiming it",
                pid=record.pid,
            )
            return True
        return False

    def _left_by_dead_local_daemon(self, record: LeaseRecord) -> bool:
        return (
            self.holds_local_lock
            and bool(record.boot_id)
            and record.boot_id == boot_id()
            and (record.db_dev, record.db_ino) == self._db_identity()
        )

    async def _take_over(self, keys: list[str]) -> None:
        """--takeover: claim the epoch above the highest key, whatever it holds."""
        epochs = sorted(e for k in keys if (e := key_epoch(k)) is not None)
        absurd = [e for e in epochs if e >= _MAX_EPOCH]
        if absurd:
            self.log.warning("deleting absurd lease epochs", keys=[lease_key(e) for e in absurd])
            await self.client.delete_objects([lease_key(e) for e in absurd])
            epochs = epochs[: len(epochs) - len(absurd)]
        top = epochs[-1] if epochs else 0
        previous = "nobody"
        if top:
            try:
                record = _parse(await self.client.get_object(lease_key(top)), top)
            except (LeaseError, ObjectNotFoundError) as exc:
                previous = f"an unreadable lease ({exc.message})"
            else:
                previous = record.describe()
                if record.released:
                    await self._claim(top + 1)
                    return
        self.txid_gap = TAKEOVER_TXID_GAP
        self.log.warning("taking over the replica (--takeover)", previous=previous)
        await self._claim(top + 1)

    async def _wait_as_standby(self, holder: LeaseRecord) -> LeaseRecord:
        """Poll the next epoch's key until `holder`'s lease is released or has lapsed."""
        self.waiting_for = holder.describe()
        self.log.warning(
            "waiting as a standby: the replica is being written by another daemon",
            holder=self.waiting_for,
        )
        seen = self.clock()
        try:
            while True:
                if await self._stopped_within(self.standby_poll):
                    raise StandbyStopped(f"stopped while waiting for {holder.describe()}")
                newer = await self._read_epoch(holder.epoch + 1)
                if newer is not None:
                    holder, seen = newer, self.clock()
                    if newer.released:
                        self.log.info("the holder released the lease", holder=newer.describe())
                        return newer
                    continue
                if self.clock() - seen < _lapse_after(holder.duration):
                    continue
                # The next key may be missing only because the holder renewed past it and
                # deleted it as old: one LIST says whether its epoch is still the newest.
                newest = await self._newest()
                if newest is not None and newest.epoch != holder.epoch:
                    holder, seen = newest, self.clock()
                    self.waiting_for = holder.describe()
                    if not holder.released:
                        continue
                    return holder
                self.log.warning("the holder's lease lapsed; taking over", holder=holder.describe())
                return holder
        finally:
            self.waiting_for = None

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stop_waiting.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def stop_waiting(self) -> None:
        """End a standby wait (a stop was requested)."""
        self._stop_waiting.set()

    async def _try_claim(self, epoch: int, *, gap: bool) -> bool:
        """Claim `epoch` (numbering above the old history if `gap`); False if someone else
        claimed it first, and the caller looks again.
        """
        try:
            await self._claim(epoch)
        except LeaseLostError:
            self._lost = None  # not ours to lose yet: go on waiting
            return False
        if gap:
            self.txid_gap = TAKEOVER_TXID_GAP
        return True

    async def release(self) -> None:
        """At a clean stop: write an already expired epoch, so a successor need not wait."""
        if self._lost is not None or not self.epoch:
            return
        record = self._record(self.epoch + 1, released=True)
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
        """Before a write: fail if the lease is lost; renew it when a third or less is left.

        Renewing creates the next epoch, so it succeeds only while the newest epoch on the store
        is still ours: a lapsed lease is continued only if nobody took it meanwhile, never
        claimed over a newer holder.
        """
        if self._lost is not None:
            raise LeaseLostError(self._lost, hint="check which host should own this replica")
        remaining = self._valid_until - self.clock()
        if remaining <= 0:
            # Lapsed: a successor may have claimed epochs above ours and, renewing, deleted the
            # next one, so creating it would succeed; one LIST tells (only after a lapse).
            keys = [info.key for info in await self.client.list_objects(LEASE_PREFIX)]
            top = max((e for k in keys if (e := key_epoch(k)) is not None), default=0)
            if top > self.epoch:
                await self._lose(top, None)
        if remaining < self.duration / 3:
            await self._claim(self.epoch + 1)

    def _record(self, epoch: int, *, released: bool = False) -> LeaseRecord:
        dev, ino = self._db_identity()
        return LeaseRecord(
            epoch,
            self.owner,
            socket.gethostname(),
            os.getpid(),
            self.db,
            time.time() + (0.0 if released else self.duration),
            released=released,
            duration=self.duration,
            boot_id=boot_id(),
            db_dev=dev,
            db_ino=ino,
        )

    def _db_identity(self) -> tuple[int, int]:
        try:
            st = os.stat(self.db)
        except OSError:
            return (-1, -1)
        return (st.st_dev, st.st_ino)

    async def _claim(self, epoch: int) -> None:
        started = self.clock()
        if self._attempt is not None and self._attempt[0] == epoch:
            started = self._attempt[1]  # that earlier request may have landed first
        self._attempt = (epoch, started)
        record = self._record(epoch)
        try:
            await self.client.put_object(
                lease_key(epoch), json.dumps(asdict(record)).encode(), create_only=True
            )
        except ObjectExistsError as exc:
            if not await self._landed_earlier(epoch):
                await self._lose(epoch, exc)
        self._attempt = None
        # Counted from before the request: the lease may have been visible to others that early.
        self._valid_until = started + self.duration
        self.epoch = epoch
        if epoch > _KEEP_EPOCHS + 1:
            try:
                await self.client.delete_objects([lease_key(epoch - _KEEP_EPOCHS - 1)])
            except ReplicaError as exc:  # a leftover epoch costs nothing; the next renewal retries
                self.log.debug("could not delete an old lease epoch", error=str(exc))

    async def _landed_earlier(self, epoch: int) -> bool:
        """Whether `epoch` holds our own earlier attempt (a request that landed but failed)."""
        try:
            record = await self._read_epoch(epoch)
        except LeaseError:
            return False
        return record is not None and record.owner == self.owner

    async def _lose(self, epoch: int, exc: ObjectExistsError | None) -> NoReturn:
        """Record that `epoch`'s holder took the replica over, and raise `LeaseLostError`."""
        try:
            holder = await self._read_epoch(epoch)
        except ReplicaError:
            holder = None
        self._lost = (
            f"replica {self.client.url} was taken over by "
            f"{holder.describe() if holder else 'another daemon'}; this daemon stops writing it"
        )
        raise LeaseLostError(self._lost, hint="check which host should own this replica") from exc

    async def _read_epoch(self, epoch: int) -> LeaseRecord | None:
        try:
            data = await self.client.get_object(lease_key(epoch))
        except ObjectNotFoundError:
            return None
        return _parse(data, epoch, url=self.client.url)

    async def _newest(self, keys: list[str] | None = None) -> LeaseRecord | None:
        """The newest lease record (LeaseError if it is corrupt), or None if there is none."""
        if keys is None:
            keys = [info.key for info in await self.client.list_objects(LEASE_PREFIX)]
        epochs = sorted((e for k in keys if (e := key_epoch(k)) is not None), reverse=True)
        for epoch in epochs:
            if epoch >= _MAX_EPOCH:
                raise _corrupt(self.client.url, epoch, "its epoch is absurdly high")
            record = await self._read_epoch(epoch)
            if record is not None:  # else deleted by the holder since the listing: look lower
                return record
        return None


def _lapse_after(duration: float) -> float:
    """Seconds a standby must see no newer epoch before a lease of `duration` has lapsed."""
    return duration * (1 + CLOCK_RATE_MARGIN) + LAPSE_MARGIN


def _corrupt(url: str, epoch: int, why: str) -> LeaseError:
    return LeaseError(
        f"lease object {lease_key(epoch)} in {url} is corrupt: {why}",
        hint="if no other daemon writes this replica, start this one with --takeover (it claims "
        "the next epoch whatever this one holds), or delete that object",
    )


def _parse(data: bytes, epoch: int, *, url: str = "the replica") -> LeaseRecord:
    """Decode and check one lease object stored under `epoch`'s key."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise _corrupt(url, epoch, "it is not JSON") from None
    if not isinstance(raw, dict):
        raise _corrupt(url, epoch, "it is not a JSON object")
    try:
        record = LeaseRecord(
            _int(raw, "epoch"),
            _str(raw, "owner"),
            _str(raw, "host"),
            _int(raw, "pid"),
            _str(raw, "db"),
            _num(raw, "expires_at"),
            _bool(raw, "released", False),
            _num(raw, "duration", DEFAULT_LEASE_DURATION),
            _str(raw, "boot_id", ""),
            _int(raw, "db_dev", -1),
            _int(raw, "db_ino", -1),
        )
    except TypeError as exc:
        raise _corrupt(url, epoch, str(exc)) from None
    if record.epoch != epoch:
        raise _corrupt(url, epoch, f"it says epoch {record.epoch}")
    if not (
        math.isfinite(record.expires_at) and _WALL_RANGE[0] <= record.expires_at < _WALL_RANGE[1]
    ):
        raise _corrupt(url, epoch, f"expires_at {record.expires_at} is not a plausible time")
    if not (math.isfinite(record.duration) and 0 < record.duration <= _MAX_DURATION):
        raise _corrupt(url, epoch, f"duration {record.duration} is not plausible")
    if not 0 <= record.pid < 1 << 32:
        raise _corrupt(url, epoch, f"pid {record.pid} is not plausible")
    return record


def _field(raw: dict[str, object], name: str, default: object) -> object:
    if name in raw:
        return raw[name]
    if default is None:
        raise TypeError(f"field {name!r} is missing")
    return default


def _int(raw: dict[str, object], name: str, default: int | None = None) -> int:
    value = _field(raw, name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"field {name!r} is {value!r}, not an integer")
    return value


def _num(raw: dict[str, object], name: str, default: float | None = None) -> float:
    value = _field(raw, name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"field {name!r} is {value!r}, not a number")
    return float(value)


def _str(raw: dict[str, object], name: str, default: str | None = None) -> str:
    value = _field(raw, name, default)
    if not isinstance(value, str):
        raise TypeError(f"field {name!r} is {value!r}, not a string")
    return value


def _bool(raw: dict[str, object], name: str, default: bool | None = None) -> bool:
    value = _field(raw, name, default)
    if not isinstance(value, bool):
        raise TypeError(f"field {name!r} is {value!r}, not true or false")
    return value
