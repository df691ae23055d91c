"""File-change wake-ups for the sync loops: inotify read from the event loop, coalesced.

Why not watchfiles alone: its Rust thread wakes every `step` ms to look at the stop event, idle
or not (20 wake-ups a second at the 50 ms step the daemon needs for prompt capture), and under
writes it hands a batch over every step.  inotify on the event loop costs nothing while nothing
changes, and the first change after a quiet spell is seen at once (no debounce).  Under steady
writes, reading the descriptor once per change would cost more than the sync it triggers, so
after each read the descriptor is left alone for `pause` seconds: the kernel merges repeated
events meanwhile, and a busy database costs at most one read (and one wake-up) per pause.

Elsewhere than Linux, watchfiles does the same job (imported only then).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog

log = structlog.get_logger()

# <sys/inotify.h>: what a write, a new file, a removal or a rename next to the database makes.
_IN_MODIFY = 0x002
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_Q_OVERFLOW = 0x4000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_MASK = _IN_MODIFY | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of NUL-padded name
_READ_SIZE = 64 * 1024

Callback = Callable[[Path], None]


class Inotify:
    """One inotify descriptor watching directories (not recursively) for the named files."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self._libc = libc
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd: int = fd
        self._dirs: dict[int, Path] = {}

    @classmethod
    def create(cls) -> Inotify | None:
        """An inotify instance, or None where there is none (not Linux, or out of instances)."""
        if not sys.platform.startswith("linux"):
            return None
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            return cls(libc)
        except (OSError, AttributeError) as exc:
            log.warning("inotify unavailable; using watchfiles", error=str(exc))
            return None

    def add_directory(self, directory: Path) -> None:
        """Report changes to files directly inside `directory`."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), _MASK)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"cannot watch {directory}")
        self._dirs[wd] = directory

    def read(self) -> tuple[set[Path], bool]:
        """The paths changed since the last read, and whether the kernel's queue overflowed
        (then anything may have changed).
        """
        changed: set[Path] = set()
        overflow = False
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return changed, overflow
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = data[offset : offset + length].rstrip(b"\0")
                offset += length
                overflow = overflow or bool(mask & _IN_Q_OVERFLOW)
                directory = self._dirs.get(wd)
                if directory is not None and name:
                    changed.add(directory / os.fsdecode(name))
            if len(data) < _READ_SIZE // 2:
                return changed, overflow

    def close(self) -> None:
        """Release the descriptor (and every watch with it)."""
        os.close(self.fd)


async def watch(targets: Mapping[Path, Callback], stop: asyncio.Event, *, pause: float) -> None:
    """Call `targets[path](path)` when `path` changes, until `stop` is set.

    Paths must be absolute; their directories must exist.  At most one round of callbacks per
    `pause` seconds; the first change after a quiet spell is reported at once.
    """
    dirs = sorted({p.parent for p in targets if p.parent.is_dir()})
    if not dirs:
        return
    inotify = Inotify.create()
    if inotify is None:
        await _watch_with_watchfiles(targets, dirs, stop, pause=pause)
        return
    loop = asyncio.get_running_loop()
    resume: asyncio.TimerHandle | None = None

    def on_readable() -> None:
        nonlocal resume
        changed, overflow = inotify.read()
        for path in targets if overflow else changed:
            callback = targets.get(path)
            if callback is not None:
                callback(path)
        # Let the kernel merge what follows for a moment instead of reading every write.
        loop.remove_reader(inotify.fd)
        resume = loop.call_later(pause, loop.add_reader, inotify.fd, on_readable)

    try:
        for directory in dirs:
            inotify.add_directory(directory)
        loop.add_reader(inotify.fd, on_readable)
        await stop.wait()
    finally:
        if resume is not None:
            resume.cancel()
        loop.remove_reader(inotify.fd)
        inotify.close()


async def _watch_with_watchfiles(
    targets: Mapping[Path, Callback], dirs: list[Path], stop: asyncio.Event, *, pause: float
) -> None:
    import watchfiles  # noqa: PLC0415 - only where inotify is missing

    ms = max(1, int(pause * 1000))
    async for changes in watchfiles.awatch(
        *dirs,
        stop_event=stop,
        debounce=ms,
        step=ms,
        watch_filter=lambda _change, path: Path(path) in targets,
        recursive=False,
    ):
        for _change, path in changes:
            targets[Path(path)](Path(path))
