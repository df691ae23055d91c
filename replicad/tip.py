"""The replica's tip: a small object naming the newest objects, so followers need no LIST.

Pure: no I/O.  Object keys hold times and the database checksum after the object, so a
follower that knows the next TXID and its own checksum still cannot guess the next key.  The
daemon therefore overwrites one small object, `tip.json`, after each upload step with the keys
of the last `TIP_KEYS` objects it uploaded (segments of level 0 and snapshots, in upload
order).  A follower GETs it (a GET costs a twelfth of a LIST on S3) and finds the next object
in it by TXID and checksum; when the tip does not lead on from its state (it fell more than
`TIP_KEYS` objects behind, a new lineage, a daemon without a tip) it falls back to listing.

The tip is advice, never trusted: every object it names is verified by its checksums before it
is applied, so a stale or foreign tip can only delay a follower, never mislead it.  That is why
it is written without fencing (``create_only``) and why losing a tip write is not an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Final

from replicad.position import ObjectName, parse_key

TIP_KEY: Final = "tip.json"
#: Keys a tip names: a follower that falls further behind than this lists once to catch up.
TIP_KEYS: Final = 64
_VERSION: Final = 1


def encode_tip(keys: Iterable[str]) -> bytes:
    """The tip object naming `keys` (oldest first)."""
    return json.dumps({"version": _VERSION, "keys": list(keys)}, separators=(",", ":")).encode()


def decode_tip(data: bytes) -> list[ObjectName]:
    """The object names a tip lists, oldest first; [] for a tip this version cannot read
    (a follower then falls back to listing, so an unreadable tip is never an error).
    """
    try:
        doc = json.loads(data)
    except ValueError:
        return []
    if not isinstance(doc, dict) or doc.get("version") != _VERSION:
        return []
    keys = doc.get("keys")
    if not isinstance(keys, list):
        return []
    names = (parse_key(k) for k in keys if isinstance(k, str))
    return [n for n in names if n is not None]
