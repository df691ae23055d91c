"""Bad input on the restore path, each met with a clear error (or the right file) and nothing
lost: odd output names, a database an application has open, a crafted database size, an S3
server whose listing never ends, a directory as the output; and the incident workflow, a
restore to a moment that lands well before it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

import replicad.restore.apply as apply_module
from replicad.clients.file import FileReplicaClient
from replicad.clients.s3 import S3ReplicaClient
from replicad.db import Database
from replicad.errors import ReplicaUnavailableError, RestoreError
from replicad.format import Transaction, TxnInfo, encode_object
from replicad.inspect import transaction_log
from replicad.position import ObjectKind, segment_name, snapshot_name
from replicad.replica import Replica
from replicad.replicator import DatabaseReplicator
from replicad.restore import make_plan, restore
from tests import workload
from tests.procs import replicad
from tests.test_restore_apply import PAGE, _header


@pytest.fixture
async def replica(tmp_path: Path) -> tuple[FileReplicaClient, Path]:
    """A small replica of a real database (format v2), and the database."""
    db_path = tmp_path / "app.db"
    app = sqlite3.connect(db_path, isolation_level=None)
    workload.setup(app)
    client = FileReplicaClient(tmp_path / "replica")
    rep = DatabaseReplicator(
        Database(db_path), [Replica("r", client)], name="app", state_dir=tmp_path / "s"
    )
    await rep.start()
    for k in range(1, 6):
        workload.apply_txn(app, 3, k)
        await rep.sync_step()
        await rep.replicas[0].upload()
    rep.close()
    app.close()
    return client, db_path


def _app_with_rows_in_wal(path: Path) -> sqlite3.Connection:
    """An application's database with committed rows only in its -wal, still open."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE precious(x)")
    conn.execute("INSERT INTO precious VALUES ('committed')")
    assert Path(f"{path}-wal").stat().st_size > 0
    return conn


def _side_files(path: Path) -> list[str]:
    return sorted(s for s in ("-wal", "-shm") if Path(f"{path}{s}").exists())


def _rows(path: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT x FROM precious").fetchall()
    finally:
        conn.close()


# -- the output path ---------------------------------------------------------------------------


async def test_output_name_with_uri_characters(
    replica: tuple[FileReplicaClient, Path], tmp_path: Path
) -> None:
    client, db_path = replica
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "a#b?c%41.db"
    result = await restore(client, out, integrity="full")
    assert result.integrity == "full"
    assert await asyncio.to_thread(os.listdir, out_dir) == [out.name]  # no stray files
    assert workload.dump(out) == workload.dump(db_path)


def test_integrity_check_reads_the_file_named(tmp_path: Path) -> None:
    """The check opens exactly the output file: garbage under a name with `#` fails it (an
    unquoted URI would check, and create, a database named by the part before the `#`).
    """
    for name in ("x#y.db", "x?y.db", "x%41.db"):
        path = tmp_path / name
        path.write_bytes(b"not a database" * 100)
        with pytest.raises(RestoreError, match="not a valid database"):
            apply_module._check_integrity(path, "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x#y.db", "x%41.db", "x?y.db"]


async def test_existing_directory_is_refused_before_downloading(
    replica: tuple[FileReplicaClient, Path], tmp_path: Path
) -> None:
    client, _ = replica
    target = tmp_path / "somedir"
    target.mkdir()
    before = dict(client.stats.requests)
    with pytest.raises(RestoreError, match="is a directory"):
        await restore(client, target, force=True)
    assert client.stats.requests == before  # not even a listing
    assert list(target.iterdir()) == []


def test_existing_directory_cli_has_no_traceback(tmp_path: Path) -> None:
    target = tmp_path / "somedir"
    target.mkdir()
    result = replicad("restore", "--force", "-o", str(target), (tmp_path / "r").as_uri())
    assert result.returncode == 1
    assert "is a directory" in result.stderr
    assert "Traceback" not in result.stderr


# -- a database an application has open -------------------------------------------------------


async def test_database_appearing_during_restore_keeps_its_wal(
    replica: tuple[FileReplicaClient, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --force, a database created at the output during the restore is left alone,
    -wal and -shm included: its committed rows stay readable.
    """
    client, _ = replica
    out = tmp_path / "live.db"
    apps: list[sqlite3.Connection] = []
    check = apply_module._check_integrity

    def app_starts_meanwhile(path: Path, mode: str) -> None:
        apps.append(_app_with_rows_in_wal(out))
        check(path, mode)

    monkeypatch.setattr(apply_module, "_check_integrity", app_starts_meanwhile)
    with pytest.raises(RestoreError, match="appeared during the restore"):
        await restore(client, out)
    assert await asyncio.to_thread(_side_files, out) == ["-shm", "-wal"]
    assert _rows(out) == [("committed",)]
    apps[0].close()


async def test_force_removes_side_files_only_once_replaced(
    replica: tuple[FileReplicaClient, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, db_path = replica
    out = tmp_path / "live.db"
    app = _app_with_rows_in_wal(out)

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(13, "Permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failing_replace)
        with pytest.raises(OSError, match="Permission denied"):
            await restore(client, out, force=True)
    assert _rows(out) == [("committed",)]  # the -wal was not removed before the failure
    app.close()
    app = _app_with_rows_in_wal(tmp_path / "other.db")  # a -wal beside the output again
    os.rename(tmp_path / "other.db-wal", f"{out}-wal")
    await restore(client, out, force=True)
    assert await asyncio.to_thread(_side_files, out) == []
    assert workload.dump(out) == workload.dump(db_path)
    app.close()


# -- a crafted database size -------------------------------------------------------------------


def _put(root: Path, key: str, data: bytes) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _object(kind: ObjectKind, txns: list[Transaction]) -> bytes:
    return encode_object(_header(kind, 0, txns), txns)


def _history(root: Path, times: list[int], *, last_db_pages: int = 4) -> None:
    """A (format v1, unproven) replica: a snapshot of 4 random pages at TXID 1, then one
    segment per later time, each rewriting page 2; the last claims `last_db_pages`.
    """
    pages = [(p, os.urandom(PAGE)) for p in range(1, 5)]
    snap = Transaction(TxnInfo(1, times[0], 4, 4), pages)
    _put(root, snapshot_name(1, times[0] // 10**6).key, _object(ObjectKind.SNAPSHOT, [snap]))
    for txid, t in enumerate(times[1:], start=2):
        size = last_db_pages if txid == len(times) else 4
        txn = Transaction(TxnInfo(txid, t, size, 1), [(2, os.urandom(PAGE))])
        name = segment_name(
            level=0, first_txid=txid, last_txid=txid, min_time_ms=t // 10**6, max_time_ms=t // 10**6
        )
        _put(root, name.key, _object(ObjectKind.SEGMENT, [txn]))


async def test_size_past_every_page_written_is_refused(tmp_path: Path) -> None:
    """A segment claiming 2**32-1 pages would make a sparse file of 2 TB: refused, nothing left."""
    _history(tmp_path / "r", [10**18, 10**18 + 10**9], last_db_pages=2**32 - 1)
    out = tmp_path / "out.db"
    async with FileReplicaClient(tmp_path / "r") as client:
        with pytest.raises(RestoreError, match="4294967295 pages"):
            await restore(client, out, integrity="none")
    assert await asyncio.to_thread(os.listdir, tmp_path) == ["r"]


# -- an S3 server whose listing never ends ------------------------------------------------------


async def _serve_same_token(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request with a ListObjectsV2 page saying "more, after token T"."""
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>'
        b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        b"<Name>b</Name><Prefix></Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys>"
        b"<IsTruncated>true</IsTruncated><NextContinuationToken>T</NextContinuationToken>"
        b"<Contents><Key>k</Key><Size>1</Size></Contents></ListBucketResult>"
    )
    try:
        while (await reader.readuntil(b"\r\n\r\n")) is not None:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.mark.usefixtures("isolated_aws_environment")
async def test_repeated_continuation_token_is_an_error() -> None:
    server = await asyncio.start_server(_serve_same_token, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = S3ReplicaClient(
            bucket="b",
            endpoint_url=f"http://127.0.0.1:{port}",
            access_key_id="test",
            secret_access_key="test",
            region="us-east-1",
            path_style=True,
            max_attempts=1,
        )
        async with client:
            for listing in (client.list_objects(), client.list_dirs("segments/")):
                with pytest.raises(ReplicaUnavailableError, match="continuation token"):
                    await asyncio.wait_for(listing, 30)
    finally:
        server.close()
        await server.wait_closed()


# -- a restore to a moment that lands well before it -------------------------------------------

T0 = 1_800_000_000 * 10**9  # 2027-01-15T08:00:00Z


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


def _gap_history(root: Path) -> None:
    """TXIDs 1-5 one second apart, then nothing for 100 s (the daemon was down), then 6-7."""
    times = [T0 + i * 10**9 for i in range(5)] + [T0 + 104 * 10**9, T0 + 105 * 10**9]
    _history(root, times)


def test_timestamp_in_a_gap_says_where_it_landed(tmp_path: Path) -> None:
    _gap_history(tmp_path / "r")
    url, moment = (tmp_path / "r").as_uri(), _iso(T0 + 34 * 10**9)
    result = replicad(
        "restore", "-o", str(tmp_path / "out.db"), "--timestamp", moment,
        "--integrity-check", "none", url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    landing = json.loads(result.stdout)["landing"]
    assert landing == {
        "target": "2027-01-15T08:00:34.000Z",
        "txid": 5,
        "committed": "2027-01-15T08:00:04.000Z",
        "shortfall_seconds": 30.0,
        "next_txid": 6,
        "next_committed": "2027-01-15T08:01:44.000Z",
    }
    assert "TXID 5" in result.stderr
    assert "30.000 s before it" in result.stderr
    assert "TXID 6" in result.stderr

    refused = replicad(
        "restore", "-o", str(tmp_path / "no.db"), "--timestamp", moment, "--max-shortfall", "10",
        url,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "more than --max-shortfall 10 s" in refused.stderr
    assert "--txid 5" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "no.db").exists()

    dry = replicad("restore", "-o", "x", "--timestamp", moment, "--dry-run", url)
    assert dry.returncode == 0
    assert json.loads(dry.stdout)["landing"]["txid"] == 5


def test_timestamp_close_to_a_commit_is_not_a_shortfall(tmp_path: Path) -> None:
    _gap_history(tmp_path / "r")
    moment = _iso(T0 + 2 * 10**9 + 500_000_000)
    result = replicad(
        "restore", "-o", str(tmp_path / "out.db"), "--timestamp", moment,
        "--integrity-check", "none", "--max-shortfall", "1", (tmp_path / "r").as_uri(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    landing = json.loads(result.stdout)["landing"]
    assert (landing["txid"], landing["shortfall_seconds"], landing["next_txid"]) == (3, 0.5, 4)
    assert "replicad: warning" not in result.stderr


# -- trailers are read with ranged reads --------------------------------------------------------


async def test_log_and_timestamps_read_trailers_not_objects(tmp_path: Path) -> None:
    """A segment of 8 MB: the transaction log and a timestamp lookup read its trailer only."""
    root = tmp_path / "r"
    _history(root, [T0, T0 + 10**9])
    big = [
        Transaction(
            TxnInfo(3 + i, T0 + (2 + i) * 10**9, 4, 2048),
            [(2, os.urandom(PAGE)) for _ in range(2048)],
        )
        for i in range(8)
    ]
    name = segment_name(
        level=0, first_txid=3, last_txid=10, min_time_ms=(T0 + 2 * 10**9) // 10**6,
        max_time_ms=(T0 + 9 * 10**9) // 10**6,
    )  # fmt: skip
    _put(root, name.key, _object(ObjectKind.SEGMENT, big))
    assert (root / name.key).stat().st_size > 8_000_000
    async with FileReplicaClient(root) as client:
        entries = await transaction_log(client)
        assert [e.txid for e in entries] == list(range(2, 11))
        plan = await make_plan(client, at_ns=T0 + 5 * 10**9 + 1)
        assert plan.target_txid == 6
        assert client.stats.bytes_downloaded < 200_000
