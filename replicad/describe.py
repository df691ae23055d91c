"""What a transaction did, in the terms an operator thinks in (`replicad log`).

A transaction in a replica is a list of page numbers.  To say "deleted rows of invoices" or
"dropped table orders", the pages are read in the database state the transaction produced
(replay.py keeps a scratch copy in that state) and mapped to what holds them:

* the schema: when the schema cookie (page 1, offset 40) moved, `sqlite_schema` before and
  after are compared, naming the tables, indexes, views and triggers created, dropped or
  altered;
* tables and indexes: SQLite's `dbstat` table maps every page to its b-tree once; after that a
  transaction's interior pages carry the map to their children (a page joining a b-tree always
  has its parent written in the same transaction), and pages that went to the freelist leave
  the map; only a page that is still unaccounted for (an overflow page, say) costs a new scan;
* the freelist (page 1, offset 36) and the database's size, before and after.

The file format facts used here are in https://www.sqlite.org/fileformat2.html.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.request import pathname2url

from replicad.replay import Step

_SCHEMA_COOKIE_AT: Final = 40
_FREELIST_TRUNK_AT: Final = 32
_FREELIST_COUNT_AT: Final = 36
_HEADER_BYTES: Final = 100  # page 1's b-tree header comes after the database header
_INTERIOR_TYPES: Final = frozenset({0x02, 0x05})  # interior index, interior table b-tree pages
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
#: Name for pages on the freelist (trunk pages: the list itself).
FREELIST: Final = "(freelist)"
#: Name for page 1 written for its database header (freelist, size), not for the schema.
HEADER: Final = "(header)"
#: Name for pages that belong to nothing known (the lock-byte page, pages past a scan).
OTHER: Final = "(other)"


@dataclass(frozen=True, slots=True)
class SchemaChange:
    """Schema objects created, dropped and altered, each as "table orders", "index i"..."""

    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    altered: list[str] = field(default_factory=list)

    def text(self) -> str:
        """One line, e.g. "dropped table orders; created index i"."""
        parts = [
            f"{verb} {', '.join(items)}"
            for verb, items in (
                ("created", self.created),
                ("dropped", self.dropped),
                ("altered", self.altered),
            )
            if items
        ]
        return "; ".join(parts) or "rewritten, same objects"  # VACUUM does this


@dataclass(frozen=True, slots=True)
class Description:
    """What one transaction did."""

    #: Pages written, per table or index name (or FREELIST, OTHER).
    touched: dict[str, int]
    schema: SchemaChange | None
    #: Pages added to the freelist (negative: taken from it).
    freed_pages: int
    #: Change in the database's size in pages.
    size_change: int

    def marks(self) -> list[str]:
        """Short marks for text output: SCHEMA ..., FREED n, GREW +n, SHRANK -n."""
        marks = []
        if self.schema is not None:
            marks.append(f"SCHEMA {self.schema.text()}")
        if self.freed_pages > 0:
            marks.append(f"FREED {self.freed_pages}")
        if self.size_change > 0:
            marks.append(f"GREW +{self.size_change}")
        elif self.size_change < 0:
            marks.append(f"SHRANK {self.size_change}")
        return marks


class Describer:
    """Describes the transactions applied to a scratch database, one after another.

    `describe` must see every transaction, in order, right after it was applied.
    """

    def __init__(self, path: Path, page_size: int) -> None:
        self.path = path
        self.page_size = page_size
        self.scans = 0  # full `dbstat` scans made (the expensive step)
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._schema = self._read_schema()
        self._cookie, self._free = self._header()
        self._trees: dict[int, str] = {}
        self._scan()

    def close(self) -> None:
        """Release the scratch file."""
        os.close(self._fd)

    def describe(self, step: Step) -> Description:
        """What `step` did; the scratch file must hold the state right after it."""
        cookie, free = self._header()
        schema = None
        if cookie != self._cookie:
            after = self._read_schema()
            schema = _schema_change(self._schema, after)
            self._schema = after
            # The map goes by the state before: dropped tables keep their names (their pages
            # are what this transaction freed), then the next one starts from a fresh scan.
            touched = self._touched(step.pages, free_changed=free != self._free, schema=True)
            self._scan()
        else:
            touched = self._touched(step.pages, free_changed=free != self._free, schema=False)
        description = Description(
            touched=touched,
            schema=schema,
            freed_pages=free - self._free,
            size_change=step.info.db_pages - step.db_pages_before,
        )
        self._cookie, self._free = cookie, free
        return description

    def _touched(
        self, pages: tuple[int, ...], *, free_changed: bool, schema: bool
    ) -> dict[str, int]:
        trunks = self._freelist(leaves=False)
        self._follow_interior_pages(pages)
        unknown = [p for p in pages if p not in self._trees and p not in trunks]
        if unknown:
            self._scan()
        counts = Counter(
            FREELIST if p in trunks else self._trees.get(p, OTHER) for p in pages if p != 1
        )
        if 1 in pages:
            # Page 1 holds the database header too: unless the schema changed, that is what
            # was written (the freelist, the size), not sqlite_schema.
            counts["sqlite_schema" if schema else HEADER] += 1
        if free_changed:
            for page in self._freelist(leaves=True):
                self._trees.pop(page, None)  # free now: whatever takes it next is new
        return dict(counts.most_common())

    def _follow_interior_pages(self, pages: tuple[int, ...]) -> None:
        """Carry each written interior page's tree to its children (parents first: a new
        subtree's pages are all written, and an interior page comes before its children in a
        b-tree's order, though not always in page numbers, so repeat until nothing changes).
        """
        for _ in range(8):
            changed = False
            for page in pages:
                tree = self._trees.get(page)
                if tree is None:
                    continue
                for child in self._children(page):
                    if self._trees.get(child) != tree:
                        self._trees[child] = tree
                        changed = True
            if not changed:
                return

    def _children(self, pgno: int) -> list[int]:
        data = os.pread(self._fd, self.page_size, (pgno - 1) * self.page_size)
        at = _HEADER_BYTES if pgno == 1 else 0
        if len(data) < at + 12 or data[at] not in _INTERIOR_TYPES:
            return []
        (cells,) = _U16.unpack_from(data, at + 3)
        children = [_U32.unpack_from(data, at + 8)[0]]
        for i in range(cells):
            (offset,) = _U16.unpack_from(data, at + 12 + 2 * i)
            if offset + 4 <= len(data):
                children.append(_U32.unpack_from(data, offset)[0])
        return children

    def _freelist(self, *, leaves: bool) -> set[int]:
        """The freelist's trunk pages (and with `leaves`, every free page)."""
        (trunk,) = _U32.unpack(os.pread(self._fd, 4, _FREELIST_TRUNK_AT))
        pages: set[int] = set()
        while trunk and trunk not in pages:
            pages.add(trunk)
            data = os.pread(self._fd, self.page_size, (trunk - 1) * self.page_size)
            if len(data) < 8:
                break
            next_trunk, count = _U32.unpack_from(data, 0)[0], _U32.unpack_from(data, 4)[0]
            if leaves:
                count = min(count, (len(data) - 8) // 4)
                pages.update(_U32.unpack_from(data, 8 + 4 * i)[0] for i in range(count))
            trunk = next_trunk
        return pages

    def _header(self) -> tuple[int, int]:
        """(schema cookie, freelist page count) from page 1."""
        head = os.pread(self._fd, _HEADER_BYTES, 0)
        cookie = _U32.unpack_from(head, _SCHEMA_COOKIE_AT)[0]
        return cookie, _U32.unpack_from(head, _FREELIST_COUNT_AT)[0]

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{pathname2url(str(self.path))}?mode=ro&immutable=1", uri=True)

    def _read_schema(self) -> dict[str, tuple[str, str | None]]:
        conn = self._connect()
        try:
            rows = conn.execute("SELECT type, name, sql FROM sqlite_schema").fetchall()
        finally:
            conn.close()
        return {f"{kind} {name}": (kind, sql) for kind, name, sql in rows}

    def _scan(self) -> None:
        conn = self._connect()
        try:
            self._trees = dict(conn.execute("SELECT pageno, name FROM dbstat").fetchall())
        finally:
            conn.close()
        self.scans += 1


def _schema_change(
    before: dict[str, tuple[str, str | None]], after: dict[str, tuple[str, str | None]]
) -> SchemaChange:
    return SchemaChange(
        created=sorted(set(after) - set(before)),
        dropped=sorted(set(before) - set(after)),
        altered=sorted(k for k in set(before) & set(after) if before[k] != after[k]),
    )
