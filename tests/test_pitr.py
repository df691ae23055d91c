"""Point-in-time restore: by timestamp, by TXID, dry runs and init-container switches."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests import workload
from tests.procs import replicad, replicated_history, start_daemon, stop, wait_for

SEED = 41


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, int]]]:
    """A replica of 300 commits made 20 ms apart, and the writer's (k, commit time) log."""
    tmp = tmp_path_factory.mktemp("pitr")
    rep = replicated_history(tmp, seed=SEED, count=300, rate=50)
    return rep, workload.read_log(tmp / "writer.log")


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat()


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_timestamp_restore_is_never_late_and_barely_early(
    history: tuple[Path, list[tuple[int, int]]], tmp_path: Path, fraction: float
) -> None:
    rep, log = history
    k_target, t_target = log[int(len(log) * fraction)]
    moment = t_target + 5_000_000  # 5 ms after commit k_target returned
    out = tmp_path / "t.db"
    result = replicad("restore", "--timestamp", _iso(moment), "-o", str(out), rep.as_uri())
    assert result.returncode == 0, result.stderr
    assert workload.integrity(out) == "ok"
    k = workload.seq_of(out)
    commit_times = dict(log)
    assert commit_times[k] <= moment, "restored a commit made after the requested moment"
    assert k >= max(i for i, t in log if t <= moment - 100_000_000), "landed >0.1 s early"
    assert k <= k_target
    assert workload.dump(out) == workload.replay(SEED, k, tmp_path / "replay.db")


def test_timestamp_in_other_zone_and_errors(
    history: tuple[Path, list[tuple[int, int]]], tmp_path: Path
) -> None:
    rep, log = history
    moment = log[150][1]
    here = datetime.fromtimestamp(moment / 1e9, tz=UTC)
    from datetime import timedelta, timezone

    elsewhere = here.astimezone(timezone(timedelta(hours=-7))).isoformat()
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    assert (
        replicad("restore", "--timestamp", here.isoformat(), "-o", str(a), rep.as_uri()).returncode
        == 0
    )
    assert replicad("restore", "--timestamp", elsewhere, "-o", str(b), rep.as_uri()).returncode == 0
    assert workload.seq_of(a) == workload.seq_of(b)
    naive = replicad(
        "restore", "--timestamp", "2026-01-01T00:00:00", "-o", str(tmp_path / "c.db"), rep.as_uri()
    )
    assert naive.returncode == 1
    assert "no time zone" in naive.stderr
    early = replicad(
        "restore", "--timestamp", "2001-01-01T00:00:00Z", "-o", str(tmp_path / "c.db"), rep.as_uri()
    )
    assert early.returncode == 1
    assert "no transaction" in early.stderr


def test_dry_run_prints_plan_and_downloads_nothing(
    history: tuple[Path, list[tuple[int, int]]], tmp_path: Path
) -> None:
    rep, _ = history
    out = tmp_path / "never.db"
    result = replicad("restore", "--dry-run", "--txid", "100", "-o", str(out), rep.as_uri())
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["target_txid"] == 100
    assert plan["objects"][0]["key"].startswith("snapshots/")
    assert plan["objects"][-1]["last_txid"] >= 100
    assert plan["bytes"] == sum(o["bytes"] for o in plan["objects"])
    assert not out.exists()


def test_init_container_switches(
    history: tuple[Path, list[tuple[int, int]]], tmp_path: Path
) -> None:
    rep, _ = history
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "db.sqlite"
    skipped = replicad("restore", "--if-replica-exists", "-o", str(out), empty.as_uri())
    assert skipped.returncode == 0
    assert not out.exists()
    assert replicad("restore", "--if-db-not-exists", "-o", str(out), rep.as_uri()).returncode == 0
    assert workload.integrity(out) == "ok"
    before = out.read_bytes()
    again = replicad("restore", "--if-db-not-exists", "-o", str(out), rep.as_uri())
    assert again.returncode == 0
    assert "skipped" in again.stdout
    assert out.read_bytes() == before


def test_ls_and_log(history: tuple[Path, list[tuple[int, int]]]) -> None:
    rep, log = history
    result = replicad("ls", "--json", rep.as_uri())
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["newest_txid"] >= 301
    assert len(summary["snapshots"]) == 1
    assert {lvl["kind"] for lvl in summary["levels"]} == {"snapshot", "segment"}
    assert replicad("status", rep.as_uri()).returncode == 0
    since, until = _iso(log[100][1] - 1_000_000_000), _iso(log[100][1] + 1_000_000_000)
    result = replicad("log", "--json", "--since", since, "--until", until, rep.as_uri())
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert 60 <= len(entries) <= 140  # about 2 s of commits at 50/s
    assert all(e["pages"] >= 1 for e in entries)
    txids = [e["txid"] for e in entries]
    assert txids == sorted(txids)
    assert txids == list(range(txids[0], txids[0] + len(txids)))


def test_snapshot_command_signals_the_daemon(tmp_path: Path) -> None:
    db, rep = tmp_path / "app.db", tmp_path / "replica"
    conn = sqlite3.connect(db)
    workload.setup(conn)
    conn.close()
    none = replicad("snapshot", str(db))
    assert none.returncode == 1
    assert "no replicad daemon is running" in none.stderr
    daemon = start_daemon([str(db), rep.as_uri()], tmp_path / "d.log")
    try:
        wait_for(lambda: len(list((rep / "snapshots").glob("*.snap"))) == 1, 20, "first snapshot")
        second = replicad(
            "replicate", str(db), (tmp_path / "other").as_uri(), "--no-standby", timeout=30
        )
        assert second.returncode == 1
        assert "already replicating" in second.stderr
        conn = sqlite3.connect(db, isolation_level=None)
        workload.apply_txn(conn, 1, 1)
        conn.close()
        result = replicad("snapshot", str(db))
        assert result.returncode == 0, result.stderr
        wait_for(lambda: len(list((rep / "snapshots").glob("*.snap"))) == 2, 20, "second snapshot")
    finally:
        assert stop(daemon) == 0
