"""A fault-injecting HTTP/1.1 reverse proxy for tests (127.0.0.1 only).

Put it between a client and a real server to see how the client copes with a bad network::

    async with FaultProxy(upstream_url, error_rate=0.1, drop_rate=0.05, seed=7) as proxy:
        client = S3ReplicaClient(endpoint_url=proxy.url, ...)
        ...
        proxy.pause()          # now the "server" is down: connections are refused
        await proxy.resume()   # and back

Each request, in arrival order, draws from a `random.Random(seed)`, so a sequential client sees
the same faults on every run.  The faults:

* `error_rate`: answer 500 or 503 (S3-style XML) without forwarding;
* `drop_rate`: close the connection without forwarding or answering;
* `drop_after_forward_rate`: forward, then close without answering: the request took effect but
  the client cannot know (the case that makes retried conditional writes interesting);
* `latency_rate`: wait `latency` seconds before forwarding.

`force()` scripts a fault for the next requests matching a method and a piece of the target
(`proxy.force("drop_after_forward", method="POST", target_contains="uploadId=")`), for tests
that need one exact failure rather than a rate.

The Host header is passed through unchanged so SigV4 signatures stay valid.  Each request gets
its own upstream connection; the whole response is buffered, which is fine for test payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

HOST = "127.0.0.1"
_ERRORS = {
    500: ("Internal Server Error", "InternalError"),
    503: ("Service Unavailable", "SlowDown"),
}
_KINDS = frozenset({"error", "drop", "drop_after_forward", "latency"})
# Hop-by-hop headers the proxy sets itself.
_HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"expect", b"proxy-connection"})


class FaultProxy:
    """Forwards to `upstream` (an `http://127.0.0.1:PORT` URL), injecting faults."""

    def __init__(
        self,
        upstream: str,
        *,
        error_rate: float = 0.0,
        drop_rate: float = 0.0,
        drop_after_forward_rate: float = 0.0,
        latency_rate: float = 0.0,
        latency: float = 0.05,
        seed: int = 0,
    ) -> None:
        target = urlsplit(upstream)
        if target.hostname != HOST or target.port is None:
            raise ValueError(f"upstream must be http://{HOST}:PORT, not {upstream!r}")
        self._upstream = (target.hostname, target.port)
        self.error_rate = error_rate
        self.drop_rate = drop_rate
        self.drop_after_forward_rate = drop_after_forward_rate
        self.latency_rate = latency_rate
        self.latency = latency
        self._random = random.Random(seed)
        self._forced: list[_ForcedFault] = []
        #: Requests received, by HTTP method (faulted ones included).
        self.requests: Counter[str] = Counter()
        #: Faults injected, by kind: "error", "drop", "drop_after_forward", "latency".
        self.injected: Counter[str] = Counter()
        self._port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """Where clients should connect."""
        return f"http://{HOST}:{self._port}"

    @property
    def total_requests(self) -> int:
        """Requests received so far, all methods."""
        return sum(self.requests.values())

    def force(
        self, kind: str, *, method: str | None = None, target_contains: str = "", times: int = 1
    ) -> None:
        """Inject fault `kind` into the next `times` requests matching `method` and target."""
        if kind not in _KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {sorted(_KINDS)}")
        self._forced.append(_ForcedFault(kind, method, target_contains.encode(), times))

    async def start(self) -> None:
        """Listen (on a free port the first time, on the same port after `pause`)."""
        self._server = await asyncio.start_server(self._serve, HOST, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    def pause(self) -> None:
        """Behave like a server that is down: refuse new connections, cut open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._connections):
            writer.transport.abort()

    async def resume(self) -> None:
        """Accept connections again on the same port."""
        await self.start()

    async def close(self) -> None:
        """Stop listening, cut every connection and wait for their handlers to end."""
        self.pause()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- per connection ------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._connections.add(writer)
        try:
            while await self._handle_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._connections.discard(writer)
            self._handlers.discard(handler)
            writer.transport.abort()

    async def _handle_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; whether the connection stays open for another."""
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, headers = _parse_head(head)
        method = request_line.split(b" ", 1)[0].decode("ascii")
        self.requests[method] += 1
        if _header(headers, b"expect").lower() == b"100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await _read_body(reader, headers)
        fault = self._take_forced(request_line) or self._draw()
        if fault == "error":
            writer.write(_error_response(self._random.choice(sorted(_ERRORS))))
            await writer.drain()
            return True
        if fault == "drop":
            return False
        if fault == "latency":
            await asyncio.sleep(self.latency)
        response = await self._forward(request_line, headers, body)
        if fault == "drop_after_forward":
            return False
        writer.write(_reframe(response, head_only=method == "HEAD"))
        await writer.drain()
        return _header(headers, b"connection").lower() != b"close"

    def _take_forced(self, request_line: bytes) -> str | None:
        """The scripted fault for this request, if one matches; counted in `injected`."""
        method, _, rest = request_line.partition(b" ")
        for forced in self._forced:
            if forced.matches(method.decode("ascii"), rest.rpartition(b" ")[0]):
                forced.times -= 1
                if forced.times == 0:
                    self._forced.remove(forced)
                self.injected[forced.kind] += 1
                return forced.kind
        return None

    def _draw(self) -> str | None:
        """The fault for this request, if any; counted in `injected`."""
        roll = self._random.random()
        slow = self._random.random() < self.latency_rate
        fault = None
        for kind, rate in (
            ("error", self.error_rate),
            ("drop", self.drop_rate),
            ("drop_after_forward", self.drop_after_forward_rate),
        ):
            if roll < rate:
                fault = kind
                break
            roll -= rate
        if slow and fault is None:
            fault = "latency"
        if fault is not None:
            self.injected[fault] += 1
        return fault

    async def _forward(
        self, request_line: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> bytes:
        """Send the request upstream on a fresh connection; the raw response."""
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        try:
            kept = [(k, v) for k, v in headers if k.lower() not in _HOP_HEADERS]
            lines = [request_line, *(k + b": " + v for k, v in kept), b"Connection: close"]
            up_writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            await up_writer.drain()
            return await up_reader.read()
        finally:
            up_writer.close()
            with contextlib.suppress(ConnectionError):
                await up_writer.wait_closed()


@dataclass
class _ForcedFault:
    kind: str
    method: str | None
    target_contains: bytes
    times: int

    def matches(self, method: str, target: bytes) -> bool:
        return self.method in (None, method) and self.target_contains in target


def _parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The request/status line and the headers of a message head."""
    first, *lines = head[:-4].split(b"\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    return first, headers


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    """The first value of header `name` (lower case), or b""."""
    return next((v for k, v in headers if k.lower() == name), b"")


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request body, as sent (chunked bodies are passed through still chunked)."""
    if b"chunked" in _header(headers, b"transfer-encoding").lower():
        body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            body += size_line + await reader.readexactly(size + 2)
            if size == 0:  # the last chunk; assume no trailers (clients here send none)
                return body
    return await reader.readexactly(int(_header(headers, b"content-length") or 0))


def _reframe(response: bytes, *, head_only: bool) -> bytes:
    """An upstream response (read to EOF) made safe to send on a kept-alive connection."""
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, headers = _parse_head(head + b"\r\n\r\n")
    kept = [(k, v) for k, v in headers if k.lower() not in _HOP_HEADERS]
    framed = _header(kept, b"content-length") or _header(kept, b"transfer-encoding")
    if not framed and not head_only:
        kept.append((b"Content-Length", str(len(body)).encode()))
    lines = [status_line, *(k + b": " + v for k, v in kept)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _error_response(status: int) -> bytes:
    """An S3-style error response that botocore's retry logic recognises."""
    reason, code = _ERRORS[status]
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>injected by FaultProxy</Message></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body
