"""The file watcher (replicad.watch) and the sync loop's backstop when it is watched."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from replicad.replicator import DatabaseReplicator
from replicad.testing import ReplicatorHarness
from replicad.watch import Inotify, watch
from tests.procs import wait_for_async

WAIT = 10.0

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")


@linux_only
async def test_a_change_is_reported_at_once_and_others_are_ignored(tmp_path: Path) -> None:
    target, other = tmp_path / "app.db-wal", tmp_path / "other"
    target.write_bytes(b"")
    seen: list[Path] = []
    stop = asyncio.Event()
    task = asyncio.create_task(watch({target: seen.append}, stop, pause=0.05))
    await asyncio.sleep(0.1)  # let the watch be installed (no event is expected meanwhile)
    assert seen == []
    other.write_bytes(b"x")
    target.write_bytes(b"y")
    await wait_for_async(lambda: seen != [], WAIT, "the change to the watched file")
    assert set(seen) == {target}
    stop.set()
    await asyncio.wait_for(task, WAIT)


@linux_only
async def test_a_burst_of_writes_is_merged(tmp_path: Path) -> None:
    """200 writes within a few milliseconds wake the callback a few times, not 200."""
    target = tmp_path / "app.db-wal"
    target.write_bytes(b"")
    seen: list[Path] = []
    stop = asyncio.Event()
    task = asyncio.create_task(watch({target: seen.append}, stop, pause=0.2))
    await asyncio.sleep(0.1)
    with target.open("ab", buffering=0) as f:
        for _ in range(200):
            f.write(b"z")
    await wait_for_async(lambda: seen != [], WAIT, "the burst")
    await asyncio.sleep(0.5)  # the merge pause is over: the rest of the burst is reported
    assert 1 <= len(seen) <= 3, len(seen)
    stop.set()
    await asyncio.wait_for(task, WAIT)


@linux_only
def test_inotify_reads_nothing_when_nothing_changed(tmp_path: Path) -> None:
    inotify = Inotify.create()
    assert inotify is not None
    try:
        inotify.add_directory(tmp_path)
        assert inotify.read() == (set(), False)
        (tmp_path / "f").write_bytes(b"1")
        changed, overflow = inotify.read()
        assert changed == {tmp_path / "f"}
        assert not overflow
    finally:
        inotify.close()


@contextlib.asynccontextmanager
async def watched_loop(
    tmp_path: Path,
) -> AsyncIterator[tuple[DatabaseReplicator, sqlite3.Connection]]:
    """A started replicator whose sync loop runs as if a watcher reported changes (none does:
    every event is "missed" unless the test reports it), ticking every 50 ms.
    """
    h = ReplicatorHarness(tmp_path)
    app = h.app()
    rep = await h.start()
    rep.watched = True
    rep.poll_interval = 0.05
    stop = asyncio.Event()
    loop = asyncio.create_task(rep.sync_loop(stop))
    try:
        yield rep, app
    finally:
        stop.set()
        rep.interrupt()
        await asyncio.wait_for(loop, WAIT)
        app.close()
        await asyncio.to_thread(rep.close)


async def test_a_watched_loop_catches_a_missed_event_at_its_poll_tick(tmp_path: Path) -> None:
    """With no file event at all, a commit is still captured by the poll tick's stat check;
    while nothing changes, the tick syncs nothing.
    """
    async with watched_loop(tmp_path) as (rep, app):
        await wait_for_async(lambda: rep.stats.syncs >= 1, WAIT, "a first sync")
        idle_from = rep.stats.syncs
        await asyncio.sleep(0.5)  # ten ticks with nothing changed
        assert rep.stats.syncs == idle_from
        txid = rep.db.state.txid
        app.execute("INSERT INTO t(v) VALUES ('missed')")
        await wait_for_async(lambda: rep.db.state.txid == txid + 1, WAIT, "the missed commit")


async def test_after_a_checkpoint_poll_ticks_sync_in_full(tmp_path: Path) -> None:
    """A write to the database file (a checkpoint) makes the ticks sync even though no file
    changes afterwards: another process's TRUNCATE may be waiting for our read mark to move.
    """
    async with watched_loop(tmp_path) as (rep, _app):
        rep.file_changed(rep.db.path)  # what the watcher reports for a checkpoint's write
        after_event = rep.stats.syncs
        # The event's sync and its follow-ups are 5; poll ticks must keep syncing after them.
        await wait_for_async(lambda: rep.stats.syncs >= after_event + 10, WAIT, "ticks syncing")
