"""Restore drills in the daemon: prove, every `verify_interval`, that a replica restores.

A backup nobody restored is a hope.  A drill runs `replicad verify` on one replica in the
background: it downloads the chain that restores the replica's newest TXID and applies it to a
table of page hashes (8 bytes a page, spilled to the state directory past 32 MiB, one object
chunk in memory at a time: bounded memory), checking every recorded checksum.  The daemon knows
more than a separate `verify` run could: the database checksum it computed *when it captured*
that TXID from the WAL.  The drill compares the two, so a passing drill proves the replica holds
exactly the state the live database had, not only a self-consistent history.

Low priority: a drill awaits storage between chunks of at most 1 MiB, so the event loop keeps
syncing and no step holds it for more than one chunk's decoding and hashing (milliseconds); and
only one drill per replica runs at a time.  Drills are off by default: each one downloads the
newest snapshot and the segments after it (an idle database that drills still costs those
requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog

from replicad.errors import FormatError, ReplicaError, RestoreError
from replicad.position import ObjectName
from replicad.verify import verify_replica

if TYPE_CHECKING:
    from replicad.replica import Replica

#: Seconds between drills; 0 turns them off (the default).
DEFAULT_VERIFY_INTERVAL: Final = 0.0
#: /readyz does not look at drills unless told to (seconds; 0: not required).
DEFAULT_READY_MAX_VERIFY_AGE: Final = 0.0
#: The first drill waits this long after start-up at most (the initial snapshot goes first).
_FIRST_DELAY: Final = 60.0


class Drill:
    """Periodic verification of one replica; its counters feed the metrics and /readyz."""

    def __init__(
        self,
        replica: Replica,
        *,
        interval: float,
        spill_dir: Path | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.replica = replica
        self.interval = interval
        self.spill_dir = spill_dir
        self.log = log or structlog.get_logger().bind(replica=replica.name)
        self.started_time = time.time()
        #: Unix time of the last drill that passed (0: none yet).
        self.last_success_time = 0.0
        self.failures = 0
        self.runs = 0
        self.last_problem: str | None = None

    async def run_once(self) -> bool:
        """Verify the replica's newest TXID now; True when it passed.  A storage outage is not
        a failure of the backups (nothing was proven either way): it is logged and the last
        success time stays where it was.
        """
        txid = self.replica.shipped_txid
        captured = _captured_checksum(self.replica.objects, txid)
        started = time.monotonic()
        self.runs += 1
        try:
            report = await verify_replica(
                self.replica.client, target_txid=txid, spill_dir=self.spill_dir
            )
        except (FormatError, RestoreError) as exc:
            return self._failed(str(exc), txid)
        except ReplicaError as exc:
            self.log.warning("restore drill could not read the replica", error=str(exc))
            return False
        if captured is not None and report.checksum != captured:
            return self._failed(
                f"the replica's state at TXID {txid} has checksum {report.checksum:016x}, but "
                f"the live database had {captured:016x} when the daemon captured it",
                txid,
            )
        self.last_success_time = time.time()
        self.last_problem = None
        self.log.info(
            "restore drill passed",
            txid=txid,
            objects=report.objects,
            bytes=report.bytes,
            live_compared=captured is not None,
            seconds=round(time.monotonic() - started, 3),
        )
        return True

    def _failed(self, problem: str, txid: int) -> bool:
        self.failures += 1
        self.last_problem = problem
        self.log.error("restore drill FAILED", txid=txid, problem=problem)
        return False

    async def loop(self, stop: asyncio.Event) -> None:
        """A drill every `interval` seconds until `stop` is set."""
        delay = min(self.interval, _FIRST_DELAY)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            if not stop.is_set() and self.replica.loaded and self.replica.shipped_txid:
                await self.run_once()
            delay = self.interval

    def readiness_problem(self, max_age: float) -> str | None:
        """Why /readyz should fail (no drill passed within `max_age` seconds), or None."""
        since = self.last_success_time or self.started_time
        age = time.time() - since
        if age <= max_age:
            return None
        what = "no restore drill has passed" if not self.last_success_time else "last drill"
        detail = f": {self.last_problem}" if self.last_problem else ""
        return f"{what} for {age:.0f} s (limit {max_age:g} s){detail}"


def _captured_checksum(objects: dict[ObjectName, int], txid: int) -> int | None:
    """The checksum the daemon recorded for `txid` when it captured it (the post checksum of
    the object it wrote ending there), None when unknown (a v1 object, not ours).
    """
    for name in objects:
        if name.last_txid == txid and name.chained and name.level == 0:
            return name.post
    return None
