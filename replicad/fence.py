"""The daemon's one write path to a replica: every put and delete checks the lease first.

`FencedWriter` wraps a `ReplicaClient` and the replica's `Lease` (lease.py).  Segments,
snapshots, compaction outputs and retention deletes all go through it, so there is one place
where "may this daemon still write here?" is decided.  It writes create-only wherever the store
enforces it, so even a write that slips past a lease check (a process paused between the check
and its request) cannot replace anything.  Lease records themselves are written by the lease:
they are the check, and create-only by construction.

Once the lease is lost the writer refuses every later call at once (`LeaseLostError`), without
another request; it logs the loss once, naming the new holder, and counts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import structlog

from replicad.clients.base import ReplicaClient
from replicad.errors import LeaseLostError
from replicad.lease import Lease


class PutFile(Protocol):
    """What a writer of whole files needs (compaction takes this, not a client)."""

    async def put_file(self, key: str, path: Path) -> None:
        """Upload the file at `path` as `key`."""


class FencedWriter:
    """Writes and deletes on one replica, each after checking this daemon's lease."""

    def __init__(
        self,
        client: ReplicaClient,
        lease: Lease | None,
        *,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.client = client
        #: None when the store cannot enforce create-only writes: no fencing (warned at start).
        self.lease = lease
        self.log = log or structlog.get_logger()
        #: Set once the lease is lost: why this replica is not written again.
        self.lost: str | None = None
        #: Times this writer found its lease lost (0 or 1: a loss is final), for metrics.
        self.lost_total = 0

    @property
    def create_only(self) -> bool:
        """Whether writes are create-only (where the store enforces it)."""
        return self.client.supports_create_only

    async def check(self) -> None:
        """Raise `LeaseLostError` if this daemon may no longer write (renewing when due)."""
        if self.lost is not None:
            raise LeaseLostError(self.lost, hint="another daemon owns this replica now")
        if self.lease is None:
            return
        try:
            await self.lease.ensure()
        except LeaseLostError as exc:
            self.lost = exc.message
            self.lost_total += 1
            self.log.error(
                "lease lost: another daemon took this replica over; not writing it again",
                error=exc.message,
            )
            raise

    async def put_object(self, key: str, data: bytes) -> None:
        """Upload `data` as `key`, create-only."""
        await self.check()
        await self.client.put_object(key, data, create_only=self.create_only)

    async def put_file(self, key: str, path: Path) -> None:
        """Upload the file at `path` as `key`, create-only."""
        await self.check()
        await self.client.put_file(key, path, create_only=self.create_only)

    async def replace_pointer(self, key: str, data: bytes) -> None:
        """Overwrite `key`, a hint that is replaced on every upload step (the followers' tip):
        the only write that is not create-only, and still only while the lease holds.
        """
        await self.check()
        await self.client.put_object(key, data)

    async def delete_objects(self, keys: Sequence[str]) -> None:
        """Delete `keys` (retention): only while this daemon still owns the replica."""
        await self.check()
        await self.client.delete_objects(keys)
