"""Restore: plan which objects rebuild the database at a TXID, then apply them.

The parts, each in its own module:

* `replicad.restore.plan`: the plan, pure (`plan_restore`, `RestorePlan`, `parse_timestamp`);
* `replicad.restore.listing`: planning against a replica (`make_plan`, `txid_at`): lists only
  the keys a plan can use, reads transaction times from trailers with range requests;
* `replicad.restore.download`: the download scheduler (objects fetched ahead, bounded memory);
* `replicad.restore.writer`: the page writer (each page's newest version written once);
* `replicad.restore.apply`: `restore` itself, which runs them and proves the result.
"""

from replicad.restore.apply import (
    INTEGRITY_MODES,
    RestoreResult,
    check_shortfall,
    iso_ns,
    restore,
)
from replicad.restore.download import DEFAULT_PREFETCH
from replicad.restore.listing import make_plan, txid_at
from replicad.restore.plan import (
    Landing,
    RestorePlan,
    empty_replica_error,
    names_from_listing,
    parse_timestamp,
    plan_restore,
)

__all__ = [
    "DEFAULT_PREFETCH",
    "INTEGRITY_MODES",
    "Landing",
    "RestorePlan",
    "RestoreResult",
    "check_shortfall",
    "empty_replica_error",
    "iso_ns",
    "make_plan",
    "names_from_listing",
    "parse_timestamp",
    "plan_restore",
    "restore",
    "txid_at",
]
