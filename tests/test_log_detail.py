"""`replicad log` says what each transaction did, reads little, and ends quietly in a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replicad.clients.file import FileReplicaClient
from replicad.format import ObjectHeader, Transaction, TxnInfo, encode_object
from replicad.position import ObjectKind, segment_name
from replicad.restore.listing import TAIL_GUESS
from replicad.restore.listing import read_trailer_of as read_transactions
from tests.incident import GOOD_INVOICES, LATER_CUSTOMERS, Incident, make_incident
from tests.procs import ROOT, clean_env, replicad


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> Incident:
    return make_incident(tmp_path_factory.mktemp("incident"))


@pytest.fixture(scope="module")
def entries(incident: Incident) -> list[dict[str, object]]:
    result = replicad("log", incident.url, "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_each_transaction_names_the_tables_it_wrote(entries: list[dict[str, object]]) -> None:
    inserts = entries[:GOOD_INVOICES]
    for entry in inserts:
        touched = entry["touched"]
        assert isinstance(touched, dict)
        assert set(touched) == {"invoices", "invoices_customer"}
        assert "schema" not in entry
    customers = [e for e in entries if e["touched"] == {"customers": 1}]
    assert len(customers) == LATER_CUSTOMERS


def test_the_delete_without_where_shows_as_freed_invoice_pages(
    entries: list[dict[str, object]],
) -> None:
    delete = entries[GOOD_INVOICES]
    touched = delete["touched"]
    assert isinstance(touched, dict)
    assert touched["invoices"] > 1
    assert int(str(delete["freed_pages"])) > 1
    assert any(str(m).startswith("FREED") for m in delete["marks"])  # type: ignore[attr-defined]
    # An ordinary insert freed nothing and changed no schema.
    assert entries[0]["freed_pages"] == 0
    assert "schema" not in entries[0]


def test_schema_changes_name_the_table(entries: list[dict[str, object]]) -> None:
    created, dropped = entries[-4], entries[-2]
    assert created["schema"] == {"created": ["table scratch"], "dropped": [], "altered": []}
    assert dropped["schema"] == {"created": [], "dropped": ["table scratch"], "altered": []}
    assert any(str(m) == "SCHEMA dropped table scratch" for m in dropped["marks"])  # type: ignore[attr-defined]
    assert "scratch" in dropped["touched"]  # type: ignore[operator]


def test_vacuum_shows_as_a_shrinking_database(entries: list[dict[str, object]]) -> None:
    vacuum = entries[-1]
    assert int(str(vacuum["size_change"])) < 0
    assert any(str(m).startswith("SHRANK -") for m in vacuum["marks"])  # type: ignore[attr-defined]
    assert vacuum["schema"] == {"created": [], "dropped": [], "altered": []}
    assert "SCHEMA rewritten, same objects" in vacuum["marks"]  # type: ignore[operator]


def test_text_output_marks_and_reports_bytes_read(incident: Incident) -> None:
    result = replicad("log", incident.url)
    assert result.returncode == 0, result.stderr
    assert "SCHEMA dropped table scratch" in result.stdout
    assert "FREED" in result.stdout
    assert "touched: customers 1" in result.stdout
    assert "bytes for the transactions" in result.stderr


def test_brief_log_readsread_transactionss_only(incident: Incident) -> None:
    result = replicad("log", incident.url, "--brief", "--json")
    assert result.returncode == 0, result.stderr
    brief = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(brief) == GOOD_INVOICES + 1 + LATER_CUSTOMERS + 4
    assert set(brief[0]) == {"txid", "committed", "pages", "db_pages"}


async def test_aread_transactions_is_read_with_range_requests(tmp_path: Path) -> None:
    """A segment bigger than the first guess: two small reads from its end, not the whole."""
    transactions = [
        Transaction(TxnInfo(txid, 1_000_000 * txid, 40, 1), [(txid % 39 + 1, os.urandom(4096))])
        for txid in range(2, 2000)
    ]
    name = segment_name(level=0, first_txid=2, last_txid=1999, min_time_ms=0, max_time_ms=1999)
    header = ObjectHeader(
        kind=ObjectKind.SEGMENT,
        page_size=4096,
        level=0,
        first_txid=2,
        last_txid=1999,
        min_time_ns=2_000_000,
        max_time_ns=1_999_000_000,
        db_pages=40,
        position=None,
    )
    data = encode_object(header, transactions)
    assert len(data) > TAIL_GUESS
    (tmp_path / "segments" / "00").mkdir(parents=True)
    (tmp_path / name.key).write_bytes(data)
    client = FileReplicaClient(tmp_path)
    infos = await read_transactions(client, name, len(data))
    assert [i.txid for i in infos] == list(range(2, 2000))
    # 40 bytes a transaction: the trailer is more than the first guess, so two reads.
    assert client.stats.requests == {"GET": 2}
    assert client.stats.bytes_downloaded < len(data) // 20


def test_log_into_a_closed_pipe_ends_quietly(incident: Incident) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "replicad", "log", incident.url, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        cwd=ROOT,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the first line (`| head -0`)
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err, err.decode()
    assert b"BrokenPipeError" not in err
    assert proc.returncode == 0


def test_an_empty_or_reversed_range_says_so(incident: Incident) -> None:
    result = replicad(
        "log", incident.url, "--since", "2030-01-02T00:00:00Z", "--until", "2030-01-01T00:00:00Z"
    )
    assert result.returncode != 0
    assert "--since is after --until" in result.stderr
    result = replicad("log", incident.url, "--brief", "--since", "2099-01-01T00:00:00Z")
    assert result.returncode != 0
    assert "no transaction was committed in that range" in result.stderr
    result = replicad("log", incident.url, "--since", "2099-01-01T00:00:00Z")
    assert result.returncode != 0
    assert "no transaction in the range" in result.stderr
    assert "Traceback" not in result.stderr
