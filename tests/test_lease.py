"""The lease (lease.py) and the fenced write path (fence.py), on a local-directory replica.

Time is injected (`Clock`): nothing here waits for a lease to expire in real time.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest

from replicad.clients.file import FileReplicaClient
from replicad.errors import LeaseError, LeaseLostError, ObjectExistsError
from replicad.fence import FencedWriter
from replicad.lease import (
    TAKEOVER_TXID_GAP,
    Lease,
    StandbyStopped,
    boot_id,
    lease_key,
)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lease(client: FileReplicaClient, db: str, clock: Clock, **kw: object) -> Lease:
    return Lease(client, db=db, duration=30, clock=clock, standby_poll=0.01, **kw)  # type: ignore[arg-type]


def _record(client: FileReplicaClient, epoch: int) -> dict[str, object]:
    path = Path(client.url.removeprefix("file://")) / lease_key(epoch)
    return dict(json.loads(path.read_bytes()))


def _put(tmp: Path, epoch: int, data: bytes) -> None:
    path = tmp / "rep" / lease_key(epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _requests(client: FileReplicaClient) -> int:
    return sum(client.stats.requests.values())


async def _held(tmp_path: Path, db: str = "/a.db") -> tuple[FileReplicaClient, Clock, Lease]:
    """A replica directory, a clock, and a lease on it already acquired."""
    client = FileReplicaClient(tmp_path / "rep")
    clock = Clock()
    lease = _lease(client, db, clock)
    await lease.acquire()
    return client, clock, lease


async def _until(predicate: object, what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_second_owner_is_refused_without_standby_and_takeover_fences_the_first(
    tmp_path: Path,
) -> None:
    client, clock, first = await _held(tmp_path)
    second = _lease(client, "/b.db", Clock())
    with pytest.raises(LeaseError, match=r"is being written by .*/a\.db") as info:
        await second.acquire()
    assert "--takeover" in (info.value.hint or "")
    await second.acquire(takeover=True)
    assert second.epoch == first.epoch + 1
    assert second.txid_gap == TAKEOVER_TXID_GAP, "a takeover numbers its history above"
    clock.now += 21  # a third of the lease left: the next check renews, and finds epoch 2 taken
    with pytest.raises(LeaseLostError, match=r"taken over by .*/b\.db"):
        await first.ensure()
    before = _requests(client)
    with pytest.raises(LeaseLostError):
        await first.ensure()
    assert _requests(client) == before, "a lost lease refuses without asking the store again"


async def test_renews_with_a_third_left_and_deletes_old_epochs(tmp_path: Path) -> None:
    client, clock, lease = await _held(tmp_path)
    await lease.ensure()
    assert lease.epoch == 1, "no renewal while most of the lease is left"
    for expected in range(2, 8):
        clock.now += 21
        await lease.ensure()
        assert lease.epoch == expected
    keys = [i.key for i in await client.list_objects("lease/")]
    assert len(keys) == 3, keys


async def test_lapsed_lease_is_continued_only_while_its_epoch_is_the_newest(
    tmp_path: Path,
) -> None:
    client, clock, lease = await _held(tmp_path)
    clock.now += 3600  # idle for an hour; nobody came
    await lease.ensure()
    assert lease.epoch == 2
    assert _record(client, 2)["owner"] == lease.owner


async def test_standby_takes_a_lapsed_lease_and_the_old_holder_stops(tmp_path: Path) -> None:
    """The rolling-deploy bug: A idle past its lease, B takes over, A's next write must fail
    (before the fix, A's `ensure` re-acquired over B's newer epoch).
    """
    client, clock_a, a = await _held(tmp_path)
    clock_b = Clock()
    b = _lease(client, "/b.db", clock_b)
    waiting = asyncio.create_task(b.acquire(standby=True))
    await _until(lambda: b.waiting_for is not None, "b to wait")
    assert "/a.db" in (b.waiting_for or "")
    clock_b.now += 30  # the holder's duration, but not the margin for clock rates
    await asyncio.sleep(0.05)
    assert not waiting.done(), "lapsed only after duration plus the margin"
    clock_b.now += 2
    assert await asyncio.wait_for(waiting, 10) is True, "it waited: the caller re-lists"
    assert b.epoch == 2
    assert b.txid_gap == TAKEOVER_TXID_GAP
    clock_a.now += 3600
    with pytest.raises(LeaseLostError, match=r"taken over by .*/b\.db"):
        await a.ensure()


async def test_standby_sees_a_renewal_and_keeps_waiting(tmp_path: Path) -> None:
    client, clock_a, a = await _held(tmp_path)
    clock_b = Clock()
    b = _lease(client, "/b.db", clock_b)
    waiting = asyncio.create_task(b.acquire(standby=True))
    await _until(lambda: b.waiting_for is not None, "b to wait")
    for _ in range(5):
        clock_a.now += 21
        await a.ensure()  # a renewal: a new epoch
        seen = client.stats.requests.get("GET", 0) + 2
        await _until(lambda n=seen: client.stats.requests.get("GET", 0) >= n, "b to see it")
        clock_b.now += 25  # over five rounds, far past the lapse, but never without renewal
    assert not waiting.done()
    await a.release()
    await asyncio.wait_for(waiting, 10)
    assert b.epoch == a.epoch + 1
    assert b.txid_gap == 0, "a released lease: no gap needed"


async def test_standby_ends_when_asked(tmp_path: Path) -> None:
    client = FileReplicaClient(tmp_path / "rep")
    await _lease(client, "/a.db", Clock()).acquire()
    b = _lease(client, "/b.db", Clock())
    waiting = asyncio.create_task(b.acquire(standby=True))
    await _until(lambda: b.waiting_for is not None, "b to wait")
    b.stop_waiting()
    with pytest.raises(StandbyStopped):
        await asyncio.wait_for(waiting, 10)
    assert b.epoch == 0
    assert b.waiting_for is None


async def test_wall_clock_plays_no_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose clock is a minute (or a year) ahead must not take over a live lease."""
    client = FileReplicaClient(tmp_path / "rep")
    await _lease(client, "/a.db", Clock()).acquire()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 365 * 86400)
    with pytest.raises(LeaseError, match="is being written by"):
        await _lease(client, "/b.db", Clock()).acquire()


async def test_release_then_same_host_recovery_needs_proof(tmp_path: Path) -> None:
    """Replaces a test that a no-op acquire() passed: each step checks the epoch and owner."""
    client = FileReplicaClient(tmp_path / "rep")
    db = tmp_path / "c.db"
    db.write_bytes(b"")
    lease = _lease(client, "/a.db", Clock())
    await lease.acquire()
    await lease.release()
    assert _record(client, 2)["released"] is True
    successor = _lease(client, "/b.db", Clock())
    await successor.acquire()  # released: claimable at once, and no gap
    assert successor.epoch == 3
    assert successor.txid_gap == 0
    assert _record(client, 3)["owner"] == successor.owner
    crashed = _lease(client, str(db), Clock(), holds_local_lock=True)
    await crashed.acquire(takeover=True)
    record = _record(client, crashed.epoch)
    assert record["boot_id"] == boot_id()
    assert record["db_ino"] == db.stat().st_ino
    for refused in (
        _lease(client, str(db), Clock()),  # no proof the earlier daemon is gone
        _lease(client, str(tmp_path / "other.db"), Clock(), holds_local_lock=True),
    ):
        with pytest.raises(LeaseError, match="is being written by"):
            await refused.acquire()
    restarted = _lease(client, str(db), Clock(), holds_local_lock=True)
    await restarted.acquire()  # same boot, same database file, its host lock is ours
    assert restarted.epoch == crashed.epoch + 1
    assert restarted.txid_gap == 0
    assert _record(client, restarted.epoch)["owner"] == restarted.owner
    replaced = tmp_path / "c2.db"
    replaced.write_bytes(b"")
    replaced.replace(db)  # another file at the same path: not the same database
    with pytest.raises(LeaseError):
        await _lease(client, str(db), Clock(), holds_local_lock=True).acquire()


def _valid(at: int, **changes: object) -> bytes:
    raw: dict[str, object] = {
        "epoch": at,
        "owner": "x",
        "host": socket.gethostname(),
        "pid": 1,
        "db": "/z.db",
        "expires_at": time.time() + 60,
    }
    raw.update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x00garbage", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (_valid(5, expires_at=1e300), "expires_at"),
        (b'{"epoch": 5, "expires_at": Infinity}', "missing"),
        (_valid(5, epoch="5"), "epoch"),
        (_valid(5, epoch=-3), "says epoch -3"),
        (_valid(5, pid="1"), "pid"),
        (_valid(5, pid=True), "pid"),
        (_valid(5, duration=-1), "duration"),
        (_valid(5, duration=1e300), "duration"),
        (_valid(5, released="yes"), "released"),
    ],
)
async def test_corrupt_lease_is_a_clear_error_and_takeover_always_works(
    tmp_path: Path, data: bytes, why: str
) -> None:
    client = FileReplicaClient(tmp_path / "rep")
    _put(tmp_path, 4, _valid(4))
    _put(tmp_path, 5, data)
    with pytest.raises(LeaseError, match=why) as info:
        await _lease(client, "/a.db", Clock()).acquire(standby=True)
    assert "lease/0000000000000005" in info.value.message
    assert "--takeover" in (info.value.hint or "")
    lease = _lease(client, "/a.db", Clock())
    await lease.acquire(takeover=True)
    assert lease.epoch == 6
    assert _record(client, 6)["owner"] == lease.owner


async def test_absurd_epoch_key(tmp_path: Path) -> None:
    client = FileReplicaClient(tmp_path / "rep")
    _put(tmp_path, 3, _valid(3))
    _put(tmp_path, (1 << 64) - 1, _valid(7))
    with pytest.raises(LeaseError, match="absurd"):
        await _lease(client, "/a.db", Clock()).acquire()
    lease = _lease(client, "/a.db", Clock())
    await lease.acquire(takeover=True)
    assert lease.epoch == 4
    assert [i.key for i in await client.list_objects("lease/")] == [lease_key(3), lease_key(4)]


async def test_fenced_writer_checks_the_lease_before_every_write_and_delete(
    tmp_path: Path,
) -> None:
    client, clock, lease = await _held(tmp_path)
    writer = FencedWriter(client, lease)
    await writer.put_object("a", b"1")
    with pytest.raises(ObjectExistsError):  # create-only: nothing is ever replaced
        await writer.put_object("a", b"2")
    await _lease(client, "/b.db", Clock()).acquire(takeover=True)
    clock.now += 25
    source = tmp_path / "f"
    source.write_bytes(b"x")
    for attempt in (
        writer.put_file("b", source),
        writer.put_object("c", b"3"),
        writer.delete_objects(["a"]),
    ):
        with pytest.raises(LeaseLostError, match="taken over"):
            await attempt
    assert writer.lost is not None
    assert writer.lost_total == 1
    assert sorted(i.key for i in await client.list_objects() if "lease" not in i.key) == ["a"]
    assert await client.get_object("a") == b"1"


async def test_a_holder_back_after_many_renewals_of_its_successor_has_lost(
    tmp_path: Path,
) -> None:
    """The successor renewed past the old holder's next epoch and deleted it as old: creating
    that key would succeed, so a lapsed holder looks for newer epochs first.
    """
    client, clock_a, a = await _held(tmp_path)
    clock_b = Clock()
    b = _lease(client, "/b.db", clock_b)
    await b.acquire(takeover=True)
    for _ in range(5):
        clock_b.now += 21
        await b.ensure()
    assert min(i.key for i in await client.list_objects("lease/")) > lease_key(2)
    clock_a.now += 3600
    with pytest.raises(LeaseLostError, match=r"taken over by .*/b\.db"):
        await a.ensure()
    assert a.epoch == 1


async def test_a_standby_that_missed_renewals_does_not_claim_a_deleted_epoch(
    tmp_path: Path,
) -> None:
    client, clock_a, a = await _held(tmp_path)
    clock_b = Clock()
    b = Lease(client, db="/b.db", duration=30, clock=clock_b, standby_poll=0.2)
    waiting = asyncio.create_task(b.acquire(standby=True))
    await _until(lambda: b.waiting_for is not None, "b to wait")
    for _ in range(5):  # between two of b's polls: epochs 2-6, and 1-3 deleted
        clock_a.now += 21
        await a.ensure()
    clock_b.now += 100
    gets = client.stats.requests.get("GET", 0)
    await _until(lambda: client.stats.requests.get("GET", 0) >= gets + 3, "b to poll twice")
    assert not waiting.done(), "the holder's newest epoch is live: keep waiting"
    assert "lease epoch 6" in (b.waiting_for or "")
    b.stop_waiting()
    with pytest.raises(StandbyStopped):
        await waiting
