"""Applying a plan: objects go newest first and each page is written once, yet the file must be
exactly what applying every transaction in order would give.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import replicad.restore.download as download_module
import replicad.restore.writer as writer_module
from replicad.checksum import file_checksum
from replicad.clients.file import FileReplicaClient
from replicad.format import ObjectHeader, Transaction, TxnInfo, encode_object
from replicad.position import ObjectKind, ObjectName, segment_name, snapshot_name
from replicad.restore import restore

PAGE = 512


class History:
    """Random transactions over a database of `PAGE`-byte pages, and the file after each."""

    def __init__(self, rng: random.Random, pages: int) -> None:
        self.rng = rng
        self.db_pages = pages
        self.file: dict[int, bytes] = {p: rng.randbytes(PAGE) for p in range(1, pages + 1)}
        self.txns: list[Transaction] = []
        self.states: dict[int, bytes] = {1: self.image()}

    def image(self) -> bytes:
        """The file as a restore leaves it: every page's last version, cut to the size."""
        return b"".join(self.file.get(p, bytes(PAGE)) for p in range(1, self.db_pages + 1))

    def commit(self) -> None:
        rng = self.rng
        txid = len(self.txns) + 2
        before, self.db_pages = self.db_pages, max(1, self.db_pages + rng.choice([0, 0, 1, 3, -4]))
        # Repeats within a transaction (the later wins) and pages past the size (dropped).  As
        # in SQLite, a transaction that grows the database writes its new pages.
        pages = [
            (rng.randint(1, self.db_pages + 2), rng.randbytes(PAGE))
            for _ in range(rng.randint(0, 6))
        ]
        pages += [(p, rng.randbytes(PAGE)) for p in range(before + 1, self.db_pages + 1)]
        rng.shuffle(pages)
        for pgno, data in pages:
            self.file[pgno] = data
        self.txns.append(Transaction(TxnInfo(txid, txid * 10**9, self.db_pages, len(pages)), pages))
        self.states[txid] = self.image()


def _header(kind: ObjectKind, level: int, txns: list[Transaction]) -> ObjectHeader:
    first, last = txns[0].info, txns[-1].info
    return ObjectHeader(
        kind=kind,
        page_size=PAGE,
        level=level,
        first_txid=first.txid,
        last_txid=last.txid,
        min_time_ns=first.commit_time_ns,
        max_time_ns=last.commit_time_ns,
        db_pages=last.db_pages,
        position=None,
    )


def _name(level: int, txns: list[Transaction]) -> ObjectName:
    return segment_name(
        level=level,
        first_txid=txns[0].info.txid,
        last_txid=txns[-1].info.txid,
        min_time_ms=txns[0].info.commit_time_ns // 10**6,
        max_time_ms=txns[-1].info.commit_time_ns // 10**6,
    )


def _compacted(txns: list[Transaction]) -> list[Transaction]:
    """What compaction makes of consecutive transactions: every record, all pages (newest
    version, ascending, none past the final size) on the last one.
    """
    merged: dict[int, bytes] = {}
    for txn in txns:
        merged.update(txn.pages)
    final = txns[-1].info
    pages = sorted((p, d) for p, d in merged.items() if p <= final.db_pages)
    records = [
        Transaction(TxnInfo(t.info.txid, t.info.commit_time_ns, t.info.db_pages, 0), [])
        for t in txns[:-1]
    ]
    records.append(
        Transaction(TxnInfo(final.txid, final.commit_time_ns, final.db_pages, len(pages)), pages)
    )
    return records


def _write_replica(root: Path, history: History, rng: random.Random, snapshot: bytes) -> None:
    def put(name: ObjectName, data: bytes) -> None:
        path = root / name.key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    pages = [(p, snapshot[(p - 1) * PAGE : p * PAGE]) for p in range(1, len(snapshot) // PAGE + 1)]
    snap = Transaction(TxnInfo(1, 10**9, len(pages), len(pages)), pages)
    put(snapshot_name(1, 1000), encode_object(_header(ObjectKind.SNAPSHOT, 0, [snap]), [snap]))
    batches: list[list[Transaction]] = []
    txns = list(history.txns)
    while txns:
        batches.append(txns[: rng.randint(1, 5)])
        del txns[: len(batches[-1])]
    for batch in batches:
        put(_name(0, batch), encode_object(_header(ObjectKind.SEGMENT, 0, batch), batch))
    for start in range(0, len(batches) - 1, 3):  # level 1: runs of three segments
        run = [t for batch in batches[start : start + 3] for t in batch]
        merged = _compacted(run)
        put(_name(1, run), encode_object(_header(ObjectKind.SEGMENT, 1, merged), merged))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("variant", ["whole", "streamed", "untracked"])
async def test_every_target_is_the_in_order_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, variant: str
) -> None:
    rng = random.Random(seed)
    history = History(rng, pages=rng.randint(1, 40))
    snapshot = history.image()
    for _ in range(rng.randint(10, 40)):
        history.commit()
    _write_replica(tmp_path / "replica", history, rng, snapshot)
    if variant == "untracked":  # page numbers beyond the bitmaps: applied again oldest first
        monkeypatch.setattr(writer_module, "TRACKED_PAGES", 8)
    if variant == "streamed":  # every object through the streaming path, in odd chunk sizes
        monkeypatch.setattr(download_module, "STREAM_ABOVE", 1)
        monkeypatch.setattr(download_module, "PART_BYTES", 1000)
        monkeypatch.setattr(download_module, "PARTS_AHEAD", 1)
        monkeypatch.setattr(download_module, "FEED_BYTES", 333)
        monkeypatch.setattr(writer_module, "TOUCHED_MAX", 1)  # and whole-bitmap merges
    async with FileReplicaClient(tmp_path / "replica") as client:
        for txid, expected in history.states.items():
            out = tmp_path / f"out-{txid}.db"
            result = await restore(client, out, target_txid=txid, integrity="none", prefetch=2)
            assert result.txid == txid
            assert out.read_bytes() == expected, txid


@pytest.mark.parametrize("db_pages", [1, 5, 9, 12])
def test_page_hasher_gives_the_files_checksum(tmp_path: Path, db_pages: int) -> None:
    """The proof's checksum from the pages as written equals the file's: later writes of a page
    win, pages never written (holes) count as zeros, pages past the size do not count.
    """
    rng = random.Random(db_pages)
    path = tmp_path / "f.db"
    path.write_bytes(b"")
    hasher = writer_module.PageHasher()
    with path.open("r+b") as f:
        for start, count in ((1, 3), (6, 2), (2, 1), (10, 3)):  # 4, 5, 8, 9 stay holes
            pages = [rng.randbytes(PAGE) for _ in range(count)]
            f.seek((start - 1) * PAGE)
            f.write(b"".join(pages))
            hasher.add(start, pages)
        f.truncate(db_pages * PAGE)
    assert hasher.checksum(PAGE, db_pages) == file_checksum(path, PAGE, db_pages)
