"""Follow mode end to end: a writer, the daemon, a follower and a reader, all real processes.

The reader keeps ONE connection to the follower's database for the whole test (through
follower kills, restarts and new lineages) and records, for every read transaction, the
writer's transaction number it sees, a digest of the whole content and (every few reads) a
quick_check.  Each record must be exactly the state after that number of the writer's
transactions: a torn or uncommitted state, or a broken read transaction, fails the test.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from replicad.clients.file import FileReplicaClient
from replicad.errors import FormatError
from replicad.follow import Follower
from replicad.format import Transaction, decode_object, encode_object
from replicad.position import ObjectName, parse_key
from replicad.tip import TIP_KEY, encode_tip
from tests import workload
from tests.procs import ROOT, clean_env, replicad, start_daemon, start_writer, stop, wait_for
from tests.s3servers import S3Server, child_env, create_bucket, unique_bucket

#: Reader process: loops read transactions on OUT until SIGTERM, one line per read:
#: "k digest check".  Arguments: OUT LOG.
READER = """
import os, signal, sqlite3, sys, time
sys.path.insert(0, os.getcwd())
from tests.workload import digest_of
out, log = sys.argv[1:3]
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
while not os.path.exists(out):
    time.sleep(0.01)
conn = sqlite3.connect(out, isolation_level=None, timeout=30)
n = 0
with open(log, "a", buffering=1) as f:
    while not stopping:
        conn.execute("BEGIN")
        k = conn.execute("SELECT seq FROM meta").fetchone()[0]
        d = digest_of(conn)
        check = conn.execute("PRAGMA quick_check").fetchone()[0] if n % 5 == 0 else "ok"
        conn.execute("COMMIT")
        f.write(f"{k} {d} {check}\\n")
        n += 1
conn.close()
"""


_FOLLOW = [sys.executable, "-m", "replicad", "restore", "--follow"]


def start_follower(
    url: str, out: Path, log: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen(
            [*_FOLLOW, "-o", str(out), url, "--log-format", "json", *extra],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=clean_env(env),
            cwd=ROOT,
        )


def start_reader(out: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", READER, str(out), str(log)], env=clean_env(), cwd=ROOT
    )


def seq(out: Path) -> int:
    try:
        return workload.seq_of(out)
    except sqlite3.Error:
        return -1


def reads(log: Path) -> list[tuple[int, str, str]]:
    rows = []
    for line in log.read_text().splitlines():
        k, d, check = line.split(" ", 2)
        rows.append((int(k), d, check))
    return rows


def check_reads(rows: list[tuple[int, str, str]], valid: dict[int, set[str]]) -> None:
    """Every read is a committed state of one of the writers' logs, and checks clean."""
    assert len(rows) > 20, "the reader hardly read"
    for k, d, check in rows:
        assert check == "ok", f"quick_check at seq {k}: {check}"
        assert d in valid.get(k, set()), f"a read at seq {k} is not the state after txn {k}"


def digests(seed: int, ks: set[int], tmp: Path) -> dict[int, str]:
    return workload.replays(seed, ks, tmp, view=workload.digest)


def final_output(log: Path) -> dict[str, object]:
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith('{"followed"')]
    doc: dict[str, object] = json.loads(lines[-1])
    return doc


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    return {
        name: tmp_path / file
        for name, file in {
            "db": "app.db",
            "replica": "replica",
            "out": "follower.db",
            "wlog": "writer.log",
            "dlog": "daemon.log",
            "flog": "follower.log",
            "rlog": "reader.log",
            "replay": "replay.db",
        }.items()
    }


def _make_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    workload.setup(conn)
    conn.close()


def test_follower_readers_see_only_committed_states_through_kills(paths: dict[str, Path]) -> None:
    """100 txn/s; the daemon is SIGKILLed and restarted, the follower SIGKILLed and SIGTERMed
    and restarted; a reader on one connection throughout only ever sees committed states; the
    last follower (resumed, in steady state) makes no LIST request.
    """
    _make_db(paths["db"])
    url = paths["replica"].as_uri()
    daemon = start_daemon([str(paths["db"]), url], paths["dlog"])
    wait_for((paths["replica"] / "snapshots").exists, 20, "the first snapshot")
    writer = start_writer(paths["db"], paths["wlog"], seed=21, count=1500, rate=100)
    follower = start_follower(url, paths["out"], paths["flog"])
    reader = start_reader(paths["out"], paths["rlog"])

    def written() -> int:
        return len(workload.read_log(paths["wlog"]))

    try:
        wait_for(lambda: written() > 300, 30, "writer progress")
        stop(daemon, signal.SIGKILL)
        wait_for(lambda: written() > 400, 30, "writer progress")
        daemon = start_daemon([str(paths["db"]), url], paths["dlog"])
        wait_for(lambda: seq(paths["out"]) >= 500, 60, "the follower to pass 500")
        stop(follower, signal.SIGKILL)
        follower = start_follower(url, paths["out"], paths["flog"])
        wait_for(lambda: seq(paths["out"]) >= 800, 60, "the restarted follower to pass 800")
        assert stop(follower) == 0
        follower = start_follower(url, paths["out"], paths["flog"])
        assert writer.wait(timeout=60) == 0
        wait_for(lambda: seq(paths["out"]) == 1500, 60, "the follower to catch up")
    finally:
        stop(reader)
        status = stop(follower)
        stop(daemon)
        writer.kill()
    assert status == 0, paths["flog"].read_text()[-3000:]
    flog = paths["flog"].read_text()
    assert "resumed following" in flog
    assert final_output(paths["flog"])["requests"].get("LIST", 0) == 0  # type: ignore[attr-defined]
    rows = reads(paths["rlog"])
    ks = [k for k, _, _ in rows]
    assert ks == sorted(ks), "the follower went back in time"
    valid = digests(21, set(ks), paths["replay"])
    check_reads(rows, {k: {d} for k, d in valid.items()})
    assert workload.integrity(paths["out"]) == "ok"
    assert workload.digest(paths["out"]) == workload.digest(paths["db"])


def test_follower_follows_a_takeover_and_a_replaced_database(paths: dict[str, Path]) -> None:
    """A daemon killed and taken over (history renumbered above a gap), then the database file
    replaced by another one: the follower says "new lineage" and keeps up with each, and the
    reader still only sees committed states of one writer or the other.
    """
    _make_db(paths["db"])
    url = paths["replica"].as_uri()
    daemon = start_daemon([str(paths["db"]), url], paths["dlog"])
    wait_for((paths["replica"] / "snapshots").exists, 20, "the first snapshot")
    follower = start_follower(url, paths["out"], paths["flog"])
    reader = start_reader(paths["out"], paths["rlog"])
    other = paths["db"].with_name("other.db")
    try:
        writer = start_writer(paths["db"], paths["wlog"], seed=31, count=200, rate=100)
        assert writer.wait(timeout=60) == 0
        wait_for(lambda: seq(paths["out"]) == 200, 60, "the follower to reach 200")
        stop(daemon, signal.SIGKILL)
        daemon = start_daemon([str(paths["db"]), url, "--takeover"], paths["dlog"])
        writer = start_writer(paths["db"], paths["wlog"], seed=31, count=100, rate=100)
        assert writer.wait(timeout=60) == 0
        wait_for(lambda: seq(paths["out"]) == 300, 60, "the follower to follow the takeover")
        assert stop(daemon) == 0
        # Another database (another writer's history) replaces the file.
        writer = start_writer(
            other, paths["wlog"].with_name("other.log"), seed=32, count=150, rate=0
        )
        assert writer.wait(timeout=60) == 0
        for suffix in ("-wal", "-shm"):
            paths["db"].with_name(paths["db"].name + suffix).unlink(missing_ok=True)
        other.replace(paths["db"])
        daemon = start_daemon([str(paths["db"]), url], paths["dlog"])
        wait_for(
            lambda: workload.digest(paths["out"]) == workload.digest(paths["db"]),
            60,
            "the follower to follow the replaced database",
        )
    finally:
        stop(reader)
        status = stop(follower)
        stop(daemon)
    assert status == 0, paths["flog"].read_text()[-3000:]
    assert paths["flog"].read_text().count("new lineage") >= 2
    rows = reads(paths["rlog"])
    ks = {k for k, _, _ in rows}
    valid: dict[int, set[str]] = {}
    for seed in (31, 32):
        for k, d in digests(seed, ks, paths["replay"].with_name(f"replay{seed}.db")).items():
            valid.setdefault(k, set()).add(d)
    check_reads(rows, valid)


def test_promote_stops_the_follower_and_leaves_a_writable_database(
    paths: dict[str, Path],
) -> None:
    """`replicad promote OUT` makes the running follower catch up and exit; OUT is then an
    ordinary database an application writes, and following it again is refused.
    """
    _make_db(paths["db"])
    url = paths["replica"].as_uri()
    daemon = start_daemon([str(paths["db"]), url], paths["dlog"])
    try:
        writer = start_writer(paths["db"], paths["wlog"], seed=41, count=100, rate=200)
        assert writer.wait(timeout=60) == 0
        follower = start_follower(url, paths["out"], paths["flog"])
        wait_for(lambda: seq(paths["out"]) == 100, 60, "the follower to catch up")
        result = replicad("promote", str(paths["out"]))
        assert result.returncode == 0, result.stderr
        assert follower.wait(timeout=30) == 0
    finally:
        stop(daemon)
    assert final_output(paths["flog"])["promoted"] is True
    assert json.loads(result.stdout)["txid"] == final_output(paths["flog"])["txid"]
    conn = sqlite3.connect(paths["out"])
    conn.execute("INSERT INTO items(k, v) VALUES (1, 'after promotion')")
    conn.commit()
    conn.close()
    again = replicad("restore", "--follow", "-o", str(paths["out"]), url, timeout=30)
    assert again.returncode == 1
    assert "is not a follower's copy" in again.stderr


# -- one step at a time ----------------------------------------------------------------------


def _level0(replica: Path) -> list[ObjectName]:
    names = (parse_key(str(p.relative_to(replica))) for p in replica.rglob("*.seg"))
    return sorted((n for n in names if n is not None and n.level == 0), key=lambda n: n.first_txid)


def _uploads_reach(replica: Path, count: int) -> Callable[[], bool]:
    return lambda: len(_level0(replica)) >= count


async def test_a_forged_segment_is_never_committed_and_the_real_one_is(tmp_path: Path) -> None:
    """The follower's proof per step: a segment with the right name and pre checksum but other
    pages is refused naming it, and OUT (and the follower's state) stay as they were.
    """
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    _make_db(db)
    daemon = start_daemon([str(db), replica.as_uri()], tmp_path / "d.log")
    try:
        wait_for((replica / "snapshots").exists, 20, "the first snapshot")
        for uploads in (1, 2):  # two uploads at least: two level-0 segments
            writer = start_writer(db, tmp_path / "w.log", seed=60 + uploads, count=40, rate=0)
            assert writer.wait(timeout=60) == 0
            wait_for(_uploads_reach(replica, uploads), 30, "an upload")
    finally:
        assert stop(daemon) == 0
    first, second = _level0(replica)[:2]
    held = (replica / second.key).read_bytes()
    for later in _level0(replica)[1:]:
        (replica / later.key).unlink()
    (replica / TIP_KEY).write_bytes(encode_tip([first.key]))
    out = tmp_path / "out.db"
    client = FileReplicaClient(replica)
    follower = Follower(client, out)
    try:
        await follower.start()
        assert follower.txid == first.last_txid
        before = workload.digest(out)
        lists = client.stats.requests.get("LIST", 0)  # the first restore's planning
        header, txns = decode_object(held, expected=second)
        forged = [
            Transaction(t.info, [(p, bytes(reversed(d))) for p, d in t.pages], t.checksum)
            for t in txns
        ]
        (replica / second.key).write_bytes(encode_object(header, forged))
        (replica / TIP_KEY).write_bytes(encode_tip([first.key, second.key]))
        with pytest.raises(FormatError, match=second.key):
            await follower.step()
        assert follower.txid == first.last_txid
        assert workload.digest(out) == before
        (replica / second.key).write_bytes(held)
        assert await follower.step() == 1
        assert follower.txid == second.last_txid
        assert client.stats.requests.get("LIST", 0) == lists  # found by the tip alone
    finally:
        await follower.close()
        await client.close()
    assert workload.integrity(out) == "ok"


@pytest.mark.parametrize("backend", ["rclone", "moto"])
async def test_follow_through_s3_with_a_config_file(
    backend: str, request: pytest.FixtureRequest, paths: dict[str, Path]
) -> None:
    """`restore --follow -c CONFIG DB` on real S3 servers: started before the daemon, it waits
    for the first snapshot; once resumed, it keeps up by reading the tip, with no LIST at all.
    """
    server: S3Server = request.getfixturevalue(f"{backend}_server")
    bucket = unique_bucket()
    await create_bucket(server, bucket)
    tmp = paths["db"].parent
    env = child_env(server, tmp)
    url = f"s3://{bucket}/app?endpoint={server.endpoint_url}&path_style=true&region=us-east-1"
    config = tmp / "c.toml"
    config.write_text(
        f"[[databases]]\npath = '{paths['db']}'\n[[databases.replicas]]\nurl = '{url}'\n"
    )
    _make_db(paths["db"])
    source = (str(paths["db"]), paths["out"], paths["flog"], "-c", str(config))
    follower = start_follower(*source, env=env)  # a standby may start before the primary
    wait_for(lambda: "first snapshot" in paths["flog"].read_text(), 30, "the follower to wait")
    daemon = start_daemon(["-c", str(config)], paths["dlog"], env=env)
    try:
        writer = start_writer(paths["db"], paths["wlog"], seed=71, count=400, rate=100)
        wait_for(lambda: seq(paths["out"]) >= 100, 60, "the follower to pass 100")
        assert stop(follower) == 0
        follower = start_follower(*source, env=env)
        assert writer.wait(timeout=60) == 0
        wait_for(lambda: seq(paths["out"]) == 400, 60, "the follower to catch up")
    finally:
        status = stop(follower)
        stop(daemon)
    assert status == 0, paths["flog"].read_text()[-3000:]
    assert "resumed following" in paths["flog"].read_text()
    requests = final_output(paths["flog"])["requests"]
    assert isinstance(requests, dict)
    assert set(requests) == {"GET"}, requests  # no LIST at all
    assert workload.digest(paths["out"]) == workload.digest(paths["db"])


def test_without_a_tip_the_follower_lists(paths: dict[str, Path]) -> None:
    """`follow_tip = false`: the daemon writes no tip.json; a follower still keeps up, by
    listing (and says so once).
    """
    _make_db(paths["db"])
    url = paths["replica"].as_uri()
    config = paths["db"].with_name("c.toml")
    config.write_text(
        f"[[databases]]\npath = '{paths['db']}'\n"
        f"[[databases.replicas]]\nurl = '{url}'\nfollow_tip = false\n"
    )
    daemon = start_daemon(["-c", str(config)], paths["dlog"])
    follower = start_follower(url, paths["out"], paths["flog"])
    try:
        writer = start_writer(paths["db"], paths["wlog"], seed=81, count=200, rate=100)
        assert writer.wait(timeout=60) == 0
        wait_for(lambda: seq(paths["out"]) == 200, 60, "the follower to catch up")
    finally:
        status = stop(follower)
        stop(daemon)
    assert status == 0
    assert not (paths["replica"] / TIP_KEY).exists()
    assert paths["flog"].read_text().count("no tip.json") == 1
    # More than the initial restore's two: it found the new objects by listing (how many
    # depends on how fast the writer went, so only "some" is asserted).
    assert final_output(paths["flog"])["requests"]["LIST"] > 2  # type: ignore[index]
