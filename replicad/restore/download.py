"""The download scheduler: the plan's objects, in the order they are applied, fetched ahead
of the one being applied in bounded memory."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

from replicad.clients.base import ReplicaClient
from replicad.position import ObjectName

#: Objects downloaded ahead of the one being applied.
DEFAULT_PREFETCH = 8
#: Bytes downloaded ahead at most; objects above `STREAM_ABOVE` are streamed, not held whole.
#: 16 MiB keeps two connections busy, more than decoding can use (64 MiB cost 60 MB of peak
#: RSS for no measurable gain).
PREFETCH_BYTES = 16 << 20
STREAM_ABOVE = 16 << 20
#: Chunks of a streamed object downloaded ahead of the decoder (at most 1 MiB each).
STREAM_QUEUE = 8
#: Bytes handed to the decoder at a time (its events for one chunk are held at once).
FEED_BYTES = 1 << 20


def root_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return root_cause(first) if isinstance(first, BaseExceptionGroup) else first


class Downloads:
    """Downloads the objects to apply ahead of the one being applied, in bounded memory.

    Objects up to `STREAM_ABOVE` are fetched whole, at most `ahead` objects and
    `PREFETCH_BYTES` at a time.  A larger one (a snapshot, a compacted level) is streamed
    through a queue of `STREAM_QUEUE` chunks.  One stream downloads at a time, in order: the
    next starts as soon as the one before has all its bytes, so a new request's latency hides
    behind decoding what is queued.  A stream waits for its reader at most as long as decoding
    the objects before it takes (at most `PREFETCH_BYTES` and a queue), well within the time
    servers give a connection left idle.
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
        self._streaming = False  # a stream is downloading

    async def chunks(self, name: ObjectName) -> AsyncIterator[bytes | memoryview]:
        """The bytes of `name`, the next object in order, in chunks of at most 1 MiB."""
        self._fill()
        fetch = self._window.pop(name)
        if isinstance(fetch, _Stream):
            self._fill()
            if fetch.pump is None:  # the first stream (those before it have all been read)
                self._unstarted.remove(fetch)
                self._begin(fetch)
            async for chunk in self._read(fetch):
                yield chunk
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
                self._unstarted.append(_Stream(name))
                self._window[self._pending.popleft()] = self._unstarted[-1]
                self._next_stream()
                continue
            if self._window and self._in_flight + size > PREFETCH_BYTES:
                return
            self._window[self._pending.popleft()] = self._tg.create_task(self._whole(name))
            self._in_flight += size

    async def _whole(self, name: ObjectName) -> bytearray:
        # Appended chunk by chunk: joining a list of chunks would briefly hold the object twice.
        data = bytearray()
        async for chunk in self._client.iter_object(name.key):
            data += chunk
        return data

    def _next_stream(self) -> None:
        if self._unstarted and not self._streaming:
            self._begin(self._unstarted.popleft())

    def _begin(self, stream: _Stream) -> None:
        self._streaming = True
        stream.pump = self._tg.create_task(self._pump(stream))

    async def _pump(self, stream: _Stream) -> None:
        chunks = self._client.iter_object(stream.name.key)
        try:
            async for chunk in chunks:
                await stream.queue.put(chunk)
        finally:
            self._streaming = False
            if isinstance(chunks, AsyncGenerator):
                await chunks.aclose()  # releases the connection at once if cancelled
        self._next_stream()
        await stream.queue.put(None)

    @staticmethod
    async def _read(stream: _Stream) -> AsyncIterator[bytes]:
        try:
            while (chunk := await stream.queue.get()) is not None:
                yield chunk
        finally:
            if stream.pump is not None:
                stream.pump.cancel()  # when the reader stops early, so does the download


@dataclass(eq=False, slots=True)
class _Stream:
    """An object downloaded into a bounded queue by a task of its own (`pump`)."""

    name: ObjectName
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(STREAM_QUEUE))
    pump: asyncio.Task[None] | None = None
