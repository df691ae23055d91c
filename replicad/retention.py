"""Retention: which objects a replica no longer needs (pure), and removing them.

A replica keeps every transaction of the retention window restorable.  The *base* is the newest
snapshot taken at or before ``now - retention - grace``: a restore to any moment inside the
window starts from it or from a later snapshot.  Snapshots older than the base and segments that
end at or before it are deleted; nothing else is.  The grace period protects restores planned a
few minutes ago that may still be downloading: the base is chosen as if it were `grace` earlier.
Segments of every level are kept back to the base, so single-transaction targets stay possible.
"""

from __future__ import annotations

from collections.abc import Iterable

from replicad.position import ObjectKind, ObjectName

#: How long history stays restorable, in seconds.
DEFAULT_RETENTION = 24 * 3600.0
#: How long before becoming unnecessary an object is still kept, for restores in progress.
DEFAULT_RETENTION_GRACE = 600.0
#: How often the daemon applies retention to each replica.
RETENTION_CHECK_INTERVAL = 300.0


def plan_retention(
    objects: Iterable[ObjectName],
    *,
    now_ms: int,
    retention: float = DEFAULT_RETENTION,
    grace: float = DEFAULT_RETENTION_GRACE,
) -> list[ObjectName]:
    """The objects that can be deleted, oldest first. Pure; an empty list when none."""
    names = list(objects)
    cutoff_ms = now_ms - int((retention + grace) * 1000)
    bases = [n for n in names if n.kind is ObjectKind.SNAPSHOT and n.max_time_ms <= cutoff_ms]
    if not bases:
        return []
    base = max(bases, key=lambda n: n.last_txid)
    doomed = [
        n
        for n in names
        if (n.kind is ObjectKind.SNAPSHOT and n.last_txid < base.last_txid)
        or (n.kind is ObjectKind.SEGMENT and n.last_txid <= base.last_txid)
    ]
    return sorted(doomed)
