"""Apply a plan: download, decode and write OUT.tmp, prove it, move it into place.

Stream each object through the verifying decoder, newest object first, and write each page at
its offset in ``OUT.tmp`` unless a newer object already did (so every page is written once),
skip transactions after the target, truncate to the target's database size, fsync, prove the
checksum (format v2) and/or run ``PRAGMA integrity_check``, move the file into place, remove
stale ``OUT-wal``/``OUT-shm``, then fsync the directory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import operator
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from replicad.checksum import pages_checksum
from replicad.clients.base import ReplicaClient
from replicad.errors import FormatError, RestoreError
from replicad.format import ObjectDecoder
from replicad.position import ObjectName
from replicad.private import adopt_owner_and_mode, create_private_fd
from replicad.restore.download import DEFAULT_PREFETCH, Downloads, root_cause
from replicad.restore.listing import make_plan
from replicad.restore.plan import Landing, RestorePlan
from replicad.restore.writer import PageWriter, UntrackedPage

#: "auto": the full check only where the checksum chain cannot prove the result (format v1);
#: a proven result is byte for byte the source's state, which passed SQLite's own checks when
#: it was written (measured cost of both: docs/benchmarks.md, "Restore at download speed").
INTEGRITY_MODES = ("auto", "full", "quick", "none")

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What a restore produced."""

    path: Path
    txid: int
    page_size: int
    db_pages: int
    objects: int
    bytes_downloaded: int
    seconds: float
    #: The database checksum the restored file was proven to have (None: format v1, unproven).
    checksum: int | None = None
    warnings: tuple[str, ...] = ()
    #: For a restore to a moment: where it landed.
    landing: Landing | None = None
    #: The check run on the result ("full", "quick" or "none"; see `INTEGRITY_MODES`).
    integrity: str = "full"


async def restore(
    client: ReplicaClient,
    output: Path,
    *,
    target_txid: int | None = None,
    at_ns: int | None = None,
    force: bool = False,
    integrity: str = "auto",
    prefetch: int = DEFAULT_PREFETCH,
    max_shortfall_ns: int | None = None,
) -> RestoreResult:
    """Restore the replica's database as of `target_txid` or the moment `at_ns` (default:
    newest) to `output`.

    `integrity`: "auto" runs ``PRAGMA integrity_check`` only on a result the checksum chain
    cannot prove (format v1 objects); "full", "quick" and "none" as named.
    `max_shortfall_ns`: refuse (before downloading) a restore to a moment that would land on a
    state committed longer than this before it (see `Landing`).

    Raises `RestoreError` for a target that exists (without `force`), an empty replica, a gap,
    a failed integrity check; `FormatError` for a corrupt object; `ReplicaError` for storage.
    """
    started = time.monotonic()
    _return_large_buffers()
    output, tmp = await asyncio.to_thread(_prepare_target, output, force)
    plan = await make_plan(client, target_txid=target_txid, at_ns=at_ns)
    for warning in plan.warnings:
        log.warning(warning)
    if plan.landing is not None and max_shortfall_ns is not None:
        check_shortfall(plan.landing, max_shortfall_ns)
    try:
        applied = await _apply(client, plan, tmp, prefetch)
        await asyncio.to_thread(_check_size, tmp, applied)
        # The proof reads the file back from the page cache while fsync writes it to disk.
        async with asyncio.TaskGroup() as tg:
            tg.create_task(asyncio.to_thread(_fsync, tmp))
            proof = tg.create_task(asyncio.to_thread(_prove, tmp, plan, applied))
        checksum = proof.result()
        if integrity == "auto":
            integrity = "none" if checksum is not None else "full"
        await asyncio.to_thread(_check_integrity, tmp, integrity)
        await asyncio.to_thread(_move_into_place, tmp, output, force)
    except BaseExceptionGroup as group:
        _remove_quietly(tmp, _sidecar(tmp, "-wal"), _sidecar(tmp, "-shm"))
        raise root_cause(group) from None
    except BaseException:
        _remove_quietly(tmp, _sidecar(tmp, "-wal"), _sidecar(tmp, "-shm"))
        raise
    return RestoreResult(
        output,
        plan.target_txid,
        applied.page_size,
        applied.db_pages,
        len(plan.objects),
        plan.total_bytes,
        time.monotonic() - started,
        checksum,
        plan.warnings,
        plan.landing,
        integrity,
    )


def check_shortfall(landing: Landing, max_shortfall_ns: int) -> None:
    """RestoreError if `landing` is more than `max_shortfall_ns` before its moment."""
    if landing.shortfall_ns <= max_shortfall_ns:
        return
    after = (
        "no later state is kept"
        if landing.next_txid is None or landing.next_commit_ns is None
        else f"the next state is TXID {landing.next_txid}, committed at "
        f"{iso_ns(landing.next_commit_ns)}"
    )
    raise RestoreError(
        f"the newest state at or before {iso_ns(landing.target_ns)} is TXID {landing.txid}, "
        f"committed at {iso_ns(landing.commit_ns)}, {landing.shortfall_ns / 1e9:.3f} s before "
        f"it (more than --max-shortfall {max_shortfall_ns / 1e9:g} s); {after}",
        hint="nothing was captured in between (was the daemon down?): restore that state "
        f"with --txid {landing.txid}, or a later one, or raise --max-shortfall",
    )


def iso_ns(ns: int) -> str:
    """Unix nanoseconds as RFC 3339 UTC with milliseconds."""
    moment = datetime.fromtimestamp(ns / 1e9, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class _Applied:
    """What applying a plan wrote, and the checksum the result must have (None: unrecorded)."""

    page_size: int
    db_pages: int
    expected: int | None
    #: The checksum of the pages as written (`PageHasher`); None: read the file to prove it.
    written: int | None = None


def _check_size(tmp: Path, applied: _Applied) -> None:
    """The database size the objects claim must be the one the restored header records, so a
    corrupt or crafted size cannot make a huge sparse file pass (SQLite header bytes 28-31).
    """
    with tmp.open("rb") as f:
        header = f.read(100)
    in_header = int.from_bytes(header[28:32], "big")
    valid = len(header) == 100 and in_header and header[24:28] == header[92:96]
    if valid and in_header != applied.db_pages:
        raise RestoreError(
            f"the objects say the database has {applied.db_pages} pages, but its own header "
            f"says {in_header}",
            hint="the replica is damaged or was written by something else; try an earlier "
            "--txid or another replica",
        )


def _prove(tmp: Path, plan: RestorePlan, applied: _Applied) -> int | None:
    """Check the restored file's database checksum against the one the chain ends with: the
    file is then the source's state at the target TXID, byte for byte.  None when the plan
    holds v1 objects, which record no checksums (logged: such a restore is unproven).
    """
    if not plan.verified or applied.expected is None:
        log.warning(
            "the replica holds format v1 objects, which record no database checksums: this "
            "restore cannot be proven equal to the source; only the integrity check vouches "
            "for it"
        )
        return None
    actual = applied.written
    if actual is None:
        actual = _file_checksum(tmp, applied.page_size, applied.db_pages)
    if actual != applied.expected:
        raise RestoreError(
            f"the restored database's checksum {actual:016x} is not {applied.expected:016x}, "
            f"the source's at TXID {plan.target_txid}: the objects "
            f"{plan.objects[0].key}..{plan.objects[-1].key} do not add up to that state",
            hint="the replica is damaged, or two histories were written to it; run `replicad "
            "verify` on it, and restore an earlier --txid or another replica",
        )
    return actual


#: glibc's `mallopt` parameters (malloc.h) and the size above which buffers are mmapped.
_M_MMAP_THRESHOLD, _M_ARENA_MAX, _MMAP_ABOVE = -3, -8, 256 << 10


def _return_large_buffers() -> None:
    """Have glibc map every buffer above 256 KiB on its own, and keep two arenas at most.

    A restore allocates and frees many 1-2 MiB buffers (chunks, parts, pages) in the event loop
    and in worker threads.  By default glibc raises its mmap threshold to the largest buffer
    freed, so later ones come from per-thread arenas that keep the memory when they are freed:
    peak RSS grew by 15-20 MB once decoding moved to a thread.  A no-op off glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_ABOVE)
        libc.mallopt(_M_ARENA_MAX, 2)


#: Threads hashing the restored file for the proof (hashlib releases the GIL on pages).
_PROOF_THREADS = 2


def _file_checksum(path: Path, page_size: int, db_pages: int) -> int:
    """`replicad.checksum.file_checksum`, the pages split between `_PROOF_THREADS` threads."""
    share = max(1, -(-db_pages // _PROOF_THREADS))
    ranges = [(first, min(share, db_pages - first + 1)) for first in range(1, db_pages + 1, share)]
    with concurrent.futures.ThreadPoolExecutor(_PROOF_THREADS) as pool:
        parts = pool.map(lambda r: pages_checksum(path, page_size, *r, chunk_bytes=1 << 20), ranges)
        return functools.reduce(operator.xor, parts, 0)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from exc


def _write_error(tmp: Path, exc: OSError) -> RestoreError:
    return RestoreError(
        f"cannot write {tmp}: {exc.strerror}",
        hint="free space on that filesystem (the result needs about the database's size), "
        "or restore to another directory",
    )


def _prepare_target(output: Path, force: bool) -> tuple[Path, Path]:
    """Refuse an existing target unless forced; clear leftovers of an interrupted restore."""
    output = output.absolute()
    if output.is_dir():
        raise RestoreError(
            f"{output} is a directory",
            hint=f"give the path of the database file to write, e.g. {output / 'restored.db'}",
        )
    if output.exists() and not force:
        raise RestoreError(
            f"{output} already exists",
            hint="restore to a new path, or pass --force to replace it (stop the application "
            "first)",
        )
    if not output.parent.is_dir():
        raise RestoreError(f"directory {output.parent} does not exist")
    tmp = output.with_name(output.name + ".tmp")
    _remove_quietly(tmp, _sidecar(tmp, "-wal"), _sidecar(tmp, "-shm"))
    return output, tmp


async def _apply(client: ReplicaClient, plan: RestorePlan, tmp: Path, prefetch: int) -> _Applied:
    try:
        fd = create_private_fd(tmp)
    except OSError as exc:
        raise RestoreError(f"cannot create {tmp}: {exc.strerror}") from exc
    writer = PageWriter(fd, plan.target_txid, newest_first=True)
    written = None
    try:
        try:
            expected = await _apply_objects(client, plan, writer, prefetch)
        except UntrackedPage:
            # A database of hundreds of GB: rather than track more pages, start again oldest
            # first, writing every version of every page.
            _close_hasher(writer)
            os.ftruncate(fd, 0)
            writer = PageWriter(fd, plan.target_txid, newest_first=False)
            expected = await _apply_objects(client, plan, writer, prefetch)
        await asyncio.to_thread(writer.finish)
        if writer.hasher is not None and expected is not None:
            hasher, size = writer.hasher, writer.page_size
            written = await asyncio.to_thread(hasher.checksum, size, writer.db_pages)
    except OSError as exc:
        raise _write_error(tmp, exc) from exc
    finally:
        _close_hasher(writer)
        os.close(fd)
    return _Applied(writer.page_size, writer.db_pages, expected, written)


def _close_hasher(writer: PageWriter) -> None:
    if writer.hasher is not None:
        writer.hasher.close()


async def _apply_objects(
    client: ReplicaClient, plan: RestorePlan, writer: PageWriter, prefetch: int
) -> int | None:
    """Apply the plan's objects in `writer`'s order, each chunk as it arrives; returns the
    database checksum the last object records for the target TXID (None: unrecorded).

    Decoding and writing run in a worker thread, one chunk at a time, while the event loop
    goes on downloading: zstd, CRC32 and the writes release the GIL, and the download no
    longer waits while a chunk is decoded (it did when both ran in the loop).
    """
    order = plan.objects[::-1] if writer.newest_first else plan.objects
    sizes = dict(zip(plan.objects, plan.sizes, strict=True))
    expected = None
    try:
        async with asyncio.TaskGroup() as tg:
            downloads = Downloads(client, order, sizes, prefetch, tg)
            for name in order:
                decoder = ObjectDecoder(expected=name)
                with _naming(client, name):
                    async for chunk in downloads.chunks(name):
                        await asyncio.to_thread(writer.feed, decoder, chunk)
                    writer.end_object(decoder)
                if name is plan.objects[-1] and decoder.index is not None:
                    expected = decoder.index.checksum_after(plan.target_txid)
        return expected
    except BaseExceptionGroup as group:
        # One root cause ends a restore; report it as itself, not as a group of one.
        raise root_cause(group) from None


@contextlib.contextmanager
def _naming(client: ReplicaClient, name: ObjectName) -> Iterator[None]:
    """Say which object was bad (the partial OUT.tmp is removed: no page reaches OUT)."""
    try:
        yield
    except FormatError as exc:
        raise FormatError(
            f"{name.key} in {client.url} is damaged: {exc.message}",
            hint=f"restore an earlier point (--txid {name.first_txid - 1}) or another replica; "
            "keep the damaged object for investigation",
        ) from exc


def _check_integrity(path: Path, mode: str) -> None:
    if mode == "none":
        return
    pragma = "quick_check" if mode == "quick" else "integrity_check"
    try:
        # Quoted: a `#`, `?` or `%` in the name would otherwise end or alter the URI, and SQLite
        # would check (or create) some other file.
        conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True)
        try:
            rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise RestoreError(f"restored file is not a valid database: {exc}") from exc
    if rows != ["ok"]:
        raise RestoreError(
            f"integrity check of the restored database failed: {'; '.join(rows[:5])}",
            hint="the replica may be damaged; try an earlier --txid or another replica",
        )


def _move_into_place(tmp: Path, output: Path, force: bool) -> None:
    """Move `tmp` to `output` (replacing it only with `force`), then remove the side files of
    the database that was there.

    The old ``-wal``/``-shm`` go only once the new file is in place: removed before, a failure
    (or a database that appeared meanwhile, without `force`) would cost an application that has
    the old database open its committed transactions.  Left beside the new file, a stale -wal
    would be replayed onto it by the next connection.
    """
    _remove_quietly(_sidecar(tmp, "-wal"), _sidecar(tmp, "-shm"))
    if force:
        if output.exists():
            adopt_owner_and_mode(tmp, output)
        os.replace(tmp, output)
    else:
        try:
            os.link(tmp, output)  # no-clobber: fails if the target appeared meanwhile
        except FileExistsError as exc:
            raise RestoreError(f"{output} appeared during the restore; not replacing it") from exc
        tmp.unlink()
    _remove_quietly(_sidecar(output, "-wal"), _sidecar(output, "-shm"))
    dir_fd = os.open(output.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _remove_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
