"""The download scheduler: the plan's objects, in the order they are applied, fetched ahead
of the one being applied in bounded memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from replicad.clients.base import ReplicaClient
from replicad.position import ObjectName

#: Objects downloaded ahead of the one being applied.
DEFAULT_PREFETCH = 8
#: Bytes downloaded ahead at most; objects above `STREAM_ABOVE` are fetched in parts, not held
#: whole.  8 MiB (plus 16 MiB of parts) keeps peak RSS under 128 MB (64 MiB once cost 60 MB of
#: peak RSS for no measurable gain).
PREFETCH_BYTES = 8 << 20
STREAM_ABOVE = 16 << 20
#: A large object's parts: their size, and how many are downloaded ahead of the decoder, each
#: over its own connection (16 MiB ahead in all).  Each request costs CPU in botocore: 2 MiB
#: parts took 0.3-0.5 CPU-s more than 8 MiB ones for a 200 MB snapshot, for no faster restore.
PART_BYTES = 8 << 20
PARTS_AHEAD = 2
#: Bytes handed to the decoder at a time (its events for one chunk are held at once).
FEED_BYTES = 1 << 20


def root_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of a (nested) group: one root cause ends a restore."""
    first = group.exceptions[0]
    return root_cause(first) if isinstance(first, BaseExceptionGroup) else first


class Downloads:
    """Downloads the objects to apply ahead of the one being applied, in bounded memory.

    Objects up to `STREAM_ABOVE` are fetched whole, at most `ahead` objects and
    `PREFETCH_BYTES` at a time.  A larger one (a snapshot, a compacted level) is fetched as
    ranged parts of `PART_BYTES`, `PARTS_AHEAD` at a time over as many connections, in order:
    one connection alone (a plain GET streamed) ran at a fraction of what the server gives
    several, and a restore is mostly one large snapshot.  One stream fetches ahead at a time:
    the next one's first parts are requested once the one before has requested its last, so a
    new object's latency hides behind decoding what came before.
    """

    def __init__(
        self,
        client: ReplicaClient,
        order: Sequence[ObjectName],
        sizes: dict[ObjectName, int],
        ahead: int,
        tg: asyncio.TaskGroup,
    ) -> None:
        self._client = client
        self._sizes = sizes
        self._ahead = max(1, ahead)
        self._tg = tg
        self._pending = deque(order)
        #: Objects in the window, in order: a whole download, or a stream.
        self._window: dict[ObjectName, asyncio.Task[bytearray] | _Stream] = {}
        self._in_flight = 0
        self._unstarted: deque[_Stream] = deque()  # streams in the window, not started yet
        self._streaming: _Stream | None = None  # the stream requesting parts ahead

    async def chunks(self, name: ObjectName) -> AsyncIterator[bytes | memoryview]:
        """The bytes of `name`, the next object in order, in chunks of at most `FEED_BYTES`."""
        self._fill()
        fetch = self._window.pop(name)
        if isinstance(fetch, _Stream):
            self._fill()
            if fetch in self._unstarted:  # (the streams before it have all been read)
                self._unstarted.remove(fetch)
                self._top_up(fetch)
            try:
                while fetch.parts:
                    part = memoryview(await fetch.parts[0])
                    fetch.parts.popleft()
                    self._top_up(fetch)
                    for start in range(0, len(part), FEED_BYTES):
                        yield part[start : start + FEED_BYTES]
            finally:
                for task in fetch.parts:  # the reader stopped early: so do the downloads
                    task.cancel()
            return
        data = memoryview(await fetch)
        self._in_flight -= self._sizes[name]
        self._fill()
        for start in range(0, len(data), FEED_BYTES):
            yield data[start : start + FEED_BYTES]

    def _fill(self) -> None:
        while self._pending and len(self._window) < self._ahead:
            name = self._pending[0]
            size = self._sizes[name]
            if size > STREAM_ABOVE:
                self._unstarted.append(_Stream(name, size))
                self._window[self._pending.popleft()] = self._unstarted[-1]
                self._next_stream()
                continue
            if self._window and self._in_flight + size > PREFETCH_BYTES:
                return
            self._window[self._pending.popleft()] = self._tg.create_task(self._whole(name))
            self._in_flight += size

    async def _whole(self, name: ObjectName) -> bytearray:
        # Into a buffer of the listed size: joining a list of chunks would briefly hold the
        # object twice, and a growing bytearray over-allocates.
        data = bytearray(self._sizes[name])
        filled = 0
        async for chunk in self._client.iter_object(name.key):
            if filled + len(chunk) > len(data):
                data[filled:] = chunk  # larger than listed: the decoder will say what is wrong
            else:
                data[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        del data[filled:]
        return data

    def _next_stream(self) -> None:
        if self._unstarted and self._streaming is None:
            self._top_up(self._unstarted.popleft())

    def _top_up(self, stream: _Stream) -> None:
        """Request `stream`'s next parts, up to `PARTS_AHEAD` not yet read."""
        if stream.requested >= stream.size:
            return
        self._streaming = stream
        while len(stream.parts) < PARTS_AHEAD and stream.requested < stream.size:
            length = min(PART_BYTES, stream.size - stream.requested)
            fetch = self._client.get_range(stream.name.key, stream.requested, length)
            stream.parts.append(self._tg.create_task(fetch))
            stream.requested += length
        if stream.requested >= stream.size:
            self._streaming = None
            self._next_stream()


@dataclass(eq=False, slots=True)
class _Stream:
    """A large object fetched as ranged parts: the tasks of those requested and not yet read."""

    name: ObjectName
    size: int
    requested: int = 0
    parts: deque[asyncio.Task[bytes | bytearray]] = field(default_factory=deque)
