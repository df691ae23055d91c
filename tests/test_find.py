"""`replicad find` on a real daemon's replica: the bad DELETE is found, with the TXID to restore."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from replicad.clients.file import FileReplicaClient
from replicad.errors import ConfigError, RestoreError
from replicad.find import Query, answer_json, find_changes
from replicad.position import segment_name
from replicad.replay import TxidRange, level0_chain, resolve_range
from replicad.restore import parse_timestamp
from tests.incident import (
    CUSTOMERS,
    GOOD_INVOICES,
    INVOICES,
    LATER_CUSTOMERS,
    Incident,
    count,
    make_incident,
)
from tests.procs import clean_env, replicad
from tests.s3servers import S3Server, child_env, create_bucket, unique_bucket


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> Incident:
    return make_incident(tmp_path_factory.mktemp("incident"))


def _find_json(incident: Incident, *args: str) -> list[dict[str, object]]:
    result = replicad("find", incident.url, *args, "--json")
    assert result.returncode == 0, result.stderr
    assert "examined" in result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_find_names_the_bad_delete_and_how_to_get_before_it(
    incident: Incident, tmp_path: Path
) -> None:
    changes = _find_json(incident, "--sql", "SELECT count(*) FROM invoices")
    # Each good insert added one invoice; then one transaction removed all of them.
    assert [c["after"] for c in changes] == [
        *range(INVOICES + 1, INVOICES + GOOD_INVOICES + 1),
        0,
    ]
    bad = changes[-1]
    assert bad["before"] == INVOICES + GOOD_INVOICES
    assert set(bad) >= {"txid", "time", "before", "after", "restore_command"}
    # The printed command, pasted into a shell in an empty directory, gives the state before it.
    command = str(bad["restore_command"])
    words = shlex.split(command)
    assert words[:4] == ["replicad", "restore", "--txid", str(int(str(bad["txid"])) - 1)]
    env = clean_env({"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / words[words.index("-o") + 1]
    assert count(out, "invoices") == INVOICES + GOOD_INVOICES
    assert count(out, "customers") == CUSTOMERS


def test_find_sees_a_dropped_table_as_an_error_answer(incident: Incident) -> None:
    changes = _find_json(incident, "--sql", "SELECT count(*) FROM scratch")
    assert [c["after"] for c in changes] == [0, 1, {"error": "no such table: scratch"}]
    assert changes[0]["before"] == {"error": "no such table: scratch"}


async def test_find_and_log_through_s3(rclone_server: S3Server, tmp_path: Path) -> None:
    """The same bad write, replicated to a real S3 server: find names it; the brief log reads
    trailers with ranged GETs.
    """
    bucket = unique_bucket()
    await create_bucket(rclone_server, bucket)
    url = f"s3://{bucket}/app?endpoint={rclone_server.endpoint_url}&path_style=true&region=auto"
    env = child_env(rclone_server, tmp_path)
    incident = await asyncio.to_thread(make_incident, tmp_path, url=url, env=env)
    found = await asyncio.to_thread(
        replicad, "find", url, "--sql", "SELECT count(*) FROM invoices", "--json", env=env
    )
    assert found.returncode == 0, found.stderr
    changes = [json.loads(line) for line in found.stdout.splitlines()]
    assert changes[-1]["before"] == INVOICES + GOOD_INVOICES
    assert changes[-1]["after"] == 0
    log = await asyncio.to_thread(replicad, "log", incident.url, "--brief", "--json", env=env)
    assert log.returncode == 0, log.stderr
    assert len(log.stdout.splitlines()) > LATER_CUSTOMERS


def test_find_respects_the_txid_range(incident: Incident) -> None:
    every = _find_json(incident, "--sql", "SELECT max(id) FROM customers")
    assert len(every) == LATER_CUSTOMERS
    first, last = int(str(every[3]["txid"])), int(str(every[5]["txid"]))
    some = _find_json(
        incident,
        "--sql",
        "SELECT max(id) FROM customers",
        "--from-txid",
        str(first),
        "--to-txid",
        str(last),
    )
    assert [c["txid"] for c in some] == [c["txid"] for c in every[3:6]]
    timed = _find_json(
        incident,
        "--sql",
        "SELECT max(id) FROM customers",
        "--since",
        str(every[3]["time"]),
        "--until",
        str(every[5]["time"]),
    )
    # The daemon stamps the commits it captures in one sync with one time, so the window can
    # hold more transactions than the three named; it holds exactly those stamped inside it.
    since, until = parse_timestamp(str(every[3]["time"])), parse_timestamp(str(every[5]["time"]))
    inside = [c["txid"] for c in every if since <= parse_timestamp(str(c["time"])) <= until]
    assert [c["txid"] for c in timed] == inside
    assert {c["txid"] for c in every[3:6]} <= set(inside)


def test_text_output_prints_the_restore_command(incident: Incident) -> None:
    result = replicad("find", incident.url, "--sql", "SELECT count(*) FROM invoices")
    assert result.returncode == 0, result.stderr
    assert "before: 305" in result.stdout
    assert "after:  0" in result.stdout
    assert "-o before-" in result.stdout
    assert shlex.quote(incident.url) in result.stdout


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM invoices",
        "ATTACH 'other.db' AS other",
        "PRAGMA writable_schema = 1",
        "SELEC count(*) FROM invoices",
    ],
)
def test_find_refuses_anything_but_a_read_only_query(incident: Incident, sql: str) -> None:
    result = replicad("find", incident.url, "--sql", sql)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "read-only" in result.stderr
    assert count(incident.db, "invoices") == 0  # nothing ran against the application's file


def test_an_empty_or_reversed_range_says_so(incident: Incident) -> None:
    result = replicad(
        "find",
        incident.url,
        "--sql",
        "SELECT 1",
        "--since",
        "2026-01-02T00:00:00Z",
        "--until",
        "2026-01-01T00:00:00Z",
    )
    assert result.returncode != 0
    assert "--since is after --until" in result.stderr
    result = replicad("find", incident.url, "--sql", "SELECT 1", "--from-txid", "999999")
    assert result.returncode != 0
    assert "no transaction in the range" in result.stderr


async def test_find_steps_rather_than_restoring_each_state(
    incident: Incident, tmp_path: Path
) -> None:
    """One restore for the whole range: later transactions cost only their own segments."""
    client = FileReplicaClient(incident.replica)
    txids = await resolve_range(client)
    gets_before = client.stats.requests.get("GET", 0)
    changes = [c async for c in find_changes(client, Query("SELECT count(*) FROM invoices"), txids)]
    assert answer_json(changes[-1].after) == 0
    snapshot_gets = sum(1 for p in (incident.replica / "snapshots").glob("*.snap"))
    segments = len(list((incident.replica / "segments" / "00").glob("*.seg")))
    # The base restore reads one snapshot (plus what its plan needs); the steps read each
    # level-0 segment once.
    assert client.stats.requests.get("GET", 0) - gets_before <= snapshot_gets + 2 * segments


def test_the_query_checker_rejects_writes_before_any_step(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "x.db"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(ConfigError):
        Query("INSERT INTO t VALUES (1)").check(db)
    assert Query("SELECT count(*) FROM t").check(db) == ((0,),)


def test_level0_chain_names_the_gap() -> None:
    names = [
        segment_name(level=0, first_txid=2, last_txid=4, min_time_ms=1, max_time_ms=2),
        segment_name(level=0, first_txid=7, last_txid=9, min_time_ms=3, max_time_ms=4),
    ]
    assert level0_chain(names, 1, 3) == names[:1]
    with pytest.raises(RestoreError, match="TXID 5"):
        level0_chain(names, 1, 9)
    assert TxidRange(1, 4).count == 3
