"""The router's HTTP/1.1 client for its upstreams, on asyncio protocols and httptools' parser.

The router sends one request per connection at a time to a known upstream and relays the
response. It needs no redirects, cookies, proxies or decompression, and at most one resend, but
every forwarded request pays for the client's speed. This client writes each request with one
write(2) and parses the response in httptools' callbacks (llhttp, the parser uvicorn and Node.js
use). In py-spy profiles under `make bench` its CPU time per request was about a quarter of
aiohttp's client (docs/benchmarks.md).

The contract with the router:

- `OriginPool.request` returns once the response's status line and headers have arrived, and
  raises `UpstreamFailure` (kind `connect`, `timeout` or `protocol`) when they do not.
- `UpstreamResponse.chunks` yields the body as it arrives, each chunk with whether it is the
  last; it raises `UpstreamFailure` when the body breaks off.
- `UpstreamResponse.release` hands the connection back for reuse only when the whole response
  was read and both sides keep the connection alive. Otherwise it closes the connection.
"""

import asyncio
import collections
import logging
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import httptools

log = logging.getLogger(__name__)

# Methods sent again when the upstream closed a kept-alive connection before any byte of the
# response arrived. These methods are safe to repeat even if the upstream did act on the request.
_RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Methods whose requests carry a body by definition, so without one they get `Content-Length: 0`.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Largest status line and header section accepted from an upstream, in bytes.
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
# While more than this many body bytes wait for the client, reading from the upstream pauses.
_PAUSE_READING_BYTES = 256 * 1024


class UpstreamFailure(Exception):
    """An upstream call failed. `kind` is `connect`, `timeout` or `protocol`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Origin:
    """Host, port and scheme of an upstream, parsed once from its base URL."""

    host: str
    port: int
    tls: bool
    # The Host header's value and the path prefix put before every request path.
    authority: bytes
    prefix: bytes

    @classmethod
    def parse(cls, base_url: str) -> "Origin":
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"The upstream URL {base_url!r} is not an http:// or https:// URL with a host."
            )
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            authority=parts.netloc.rsplit("@", 1)[-1].encode("ascii"),
            prefix=parts.path.rstrip("/").encode("ascii"),
        )


class UpstreamResponse:
    """A response whose head has arrived; its body arrives through `chunks`."""

    __slots__ = ("_body", "_complete", "_connection", "_error", "_released", "headers", "status")

    def __init__(self, connection: "UpstreamConnection") -> None:
        self.status = 0
        # Names and values as received, in order; names keep the upstream's case.
        self.headers: list[tuple[bytes, bytes]] = []
        self._connection = connection
        self._body: list[bytes] = []
        self._complete = False
        self._error: UpstreamFailure | None = None
        self._released = False

    def header(self, name: bytes) -> str:
        """Return the first value of header `name` (lower case), or an empty string."""
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return ""

    async def chunks(self) -> AsyncIterator[tuple[bytes, bool]]:
        """Yield the body's chunks as they arrive, each with True when it ends the body.

        A body that has fully arrived comes as one chunk. Raise UpstreamFailure when the body
        breaks off or stops arriving for longer than the read timeout.
        """
        connection = self._connection
        while True:
            if self._body:
                data = self._body[0] if len(self._body) == 1 else b"".join(self._body)
                self._body.clear()
                connection.body_taken()
                yield data, self._complete
                if self._complete:
                    return
            elif self._complete:
                yield b"", True
                return
            elif self._error is not None:
                raise self._error
            else:
                await connection.wait_for_data()

    async def read(self, limit: int) -> bytes:
        """Return the whole body, or raise ValueError once it is larger than `limit` bytes."""
        body = bytearray()
        async for chunk, _ in self.chunks():
            body += chunk
            if len(body) > limit:
                raise ValueError(f"the body is larger than {limit} bytes")
        return bytes(body)

    def release(self) -> None:
        """Give the connection back for reuse when the exchange ended cleanly, else close it."""
        if self._released:
            return
        self._released = True
        self._connection.finish(reusable=self._complete and self._error is None)

    async def __aenter__(self) -> "UpstreamResponse":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


class UpstreamConnection(asyncio.Protocol):
    """One kept-alive connection to an upstream, carrying one exchange at a time."""

    def __init__(self, pool: "OriginPool") -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # The upstream closed the connection while a request was out and before any byte of its
        # response arrived, so no response to that request came back.
        self.lost_before_response = False
        self.idle_since = 0.0
        # The exchange in progress.
        self._response: UpstreamResponse | None = None
        self._parser: Any = None
        self._head_bytes = 0
        self._head_done: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._received_any = False
        self._eof_ends_body = False
        self._head_request = False
        self._buffered = 0
        self._paused = False
        self._reusable = True
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:
            # Bytes while no request is outstanding break the one-exchange-at-a-time rule.
            self.close()
            return
        self._received_any = True
        self._last_read = self.pool.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("protocol", "the upstream switched protocols, which the router never asks")
        except httptools.HttpParserError as error:
            self._fail("protocol", f"the upstream sent an invalid response: {error}")
        except UpstreamFailure as failure:
            self._fail(failure.kind, str(failure))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost_before_response = self._response is not None and not self._received_any
        response = self._response
        if response is None or response._complete:
            return
        if self._eof_ends_body and self._head_done is not None and self._head_done.done():
            # A body without a length or chunked coding ends when the connection closes.
            self._complete_body()
            self._eof_ends_body = False
            return
        self._fail("protocol", "the upstream closed the connection before the response ended")

    def pause_writing(self) -> None:  # the request is written whole; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._after_response():
            return
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
            raise UpstreamFailure(
                "protocol", f"the upstream's response head is over {MAX_RESPONSE_HEAD_BYTES} bytes"
            )
        assert self._response is not None
        self._response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._after_response():
            return
        response = self._response
        assert response is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (100 Continue, 103 Early Hints): the final one follows.
            response.headers.clear()
            return
        response.status = status
        if self._head_request:
            # httptools has no way to mark a HEAD response as bodiless, so the head ends it here.
            # The connection is not reused, in case the upstream sends a body anyway.
            self._complete_body(reusable=False)
        else:
            self._eof_ends_body = not any(
                name.lower() in (b"content-length", b"transfer-encoding")
                for name, _ in response.headers
            )
        if self._head_done is not None and not self._head_done.done():
            self._head_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is None or self._after_response():
            return
        response._body.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_READING_BYTES and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        response = self._response
        if response is None or response.status == 0 or self._after_response():
            return  # the end of an interim response, or bytes after the response
        self._complete_body(reusable=self._parser.should_keep_alive())

    def _after_response(self) -> bool:
        """Return True for parser events after the response ended, and stop reusing the connection.

        One request gets one response, so anything after it (a body sent for a HEAD request, a
        second response) must not change the response already returned.
        """
        response = self._response
        if response is None or not response._complete:
            return False
        self._reusable = False
        return True

    # The exchange

    async def exchange(self, request: bytes, head_request: bool) -> UpstreamResponse:
        """Write `request` and return the response once its head arrived."""
        loop = self.pool.loop
        timeout = self.pool.read_timeout
        response = UpstreamResponse(self)
        self._response = response
        self._parser = httptools.HttpResponseParser(self)
        self._head_bytes = 0
        self._received_any = False
        self.lost_before_response = False
        self._eof_ends_body = False
        self._head_request = head_request
        self._buffered = 0
        self._reusable = True
        self._head_done = loop.create_future()
        self._last_read = loop.time()
        self._timer = loop.call_at(self._last_read + timeout, self._check_timeout, timeout)
        assert self.transport is not None
        self.transport.write(request)
        await self._head_done
        return response

    def _check_timeout(self, timeout: float) -> None:
        """Fail the exchange when nothing arrived for `timeout` seconds, else check again later.

        One timer per exchange, moved forward only when it fires, costs less than moving it on
        every read.
        """
        self._timer = None
        if self._response is None or self._response._complete:
            return
        loop = self.pool.loop
        if self._paused:
            # Reading stopped because the client is slow, not because the upstream is.
            self._last_read = loop.time()
        deadline = self._last_read + timeout
        if loop.time() < deadline:
            self._timer = loop.call_at(deadline, self._check_timeout, timeout)
            return
        head_arrived = self._response.status != 0
        awaited = "more of the response body" if head_arrived else "the response head"
        self._fail("timeout", f"the upstream sent nothing for {timeout:g} s; awaited {awaited}")

    async def wait_for_data(self) -> None:
        self._waiter = self.pool.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def body_taken(self) -> None:
        self._buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def finish(self, reusable: bool) -> None:
        """End the exchange: the connection goes back to the pool or is closed."""
        self._cancel_timer()
        self._response = None
        self._parser = None
        self._head_done = None
        if reusable and self._reusable and not self.closed and not self._paused:
            self.pool.put_back(self)
        else:
            self.close()
            self.pool.put_back(None)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _complete_body(self, reusable: bool = True) -> None:
        response = self._response
        assert response is not None
        response._complete = True
        self._reusable = self._reusable and reusable
        self._cancel_timer()
        if self._head_done is not None and not self._head_done.done():
            self._head_done.set_result(None)
        self._wake()

    def _fail(self, kind: str, detail: str) -> None:
        self._cancel_timer()
        self._reusable = False
        response = self._response
        failure = UpstreamFailure(kind, detail)
        if response is not None and not response._complete:
            response._error = failure
        if self._head_done is not None and not self._head_done.done():
            self._head_done.set_exception(failure)
        self._wake()
        self.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class OriginPool:
    """Kept-alive connections to one upstream, at most `limit` of them open at once."""

    def __init__(
        self,
        origin: Origin,
        *,
        limit: int,
        keepalive_seconds: float,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.origin = origin
        self.limit = limit
        self.keepalive_seconds = keepalive_seconds
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.loop = asyncio.get_running_loop()
        self._idle: collections.deque[UpstreamConnection] = collections.deque()
        self._open = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ssl = ssl.create_default_context() if origin.tls else None

    async def request(self, method: str, request: bytes) -> UpstreamResponse:
        """Send the encoded request and return its response once the head arrived."""
        head_request = method == "HEAD"
        connection, reused = await self._acquire()
        while True:
            try:
                return await connection.exchange(request, head_request)
            except BaseException as error:
                connection.finish(reusable=False)
                # Sent again only when the upstream closed a kept-alive connection as the request
                # went out. A timeout is not: the upstream may still be working on the request.
                if not (
                    isinstance(error, UpstreamFailure) and reused
                    and connection.lost_before_response and method in _RETRYABLE_METHODS
                ):
                    raise
                log.info(
                    "kept-alive upstream connection was closed; sending again on a new one",
                    extra={"upstream": self.origin.authority.decode(), "error": str(error)},
                )
            # A new connection, so the request is sent at most twice.
            connection, reused = await self._connect_counted(), False

    def put_back(self, connection: UpstreamConnection | None) -> None:
        """Take back a connection for reuse, or note with None that one was closed."""
        if connection is None:
            self._open -= 1
        else:
            connection.idle_since = self.loop.time()
            self._idle.append(connection)
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def _acquire(self) -> tuple[UpstreamConnection, bool]:
        while True:
            now = self.loop.time()
            while self._idle:
                # The most recently used first: it is the least likely to have been closed.
                connection = self._idle.pop()
                if not connection.closed and now - connection.idle_since < self.keepalive_seconds:
                    return connection, True
                connection.close()
                self._open -= 1
            if self._open < self.limit:
                return await self._connect_counted(), False
            waiter = self.loop.create_future()
            self._waiting.append(waiter)
            await waiter

    async def _connect_counted(self) -> UpstreamConnection:
        self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._open -= 1
            raise

    async def _connect(self) -> UpstreamConnection:
        origin = self.origin
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, protocol = await self.loop.create_connection(
                    lambda: UpstreamConnection(self), origin.host, origin.port, ssl=self._ssl,
                )
        except TimeoutError as error:
            raise UpstreamFailure(
                "timeout",
                f"no connection to {origin.host}:{origin.port} within {self.connect_timeout:g} s",
            ) from error
        except OSError as error:
            raise UpstreamFailure(
                "connect", f"cannot connect to {origin.host}:{origin.port}: {error}"
            ) from error
        # uvloop may call connection_made only on a later turn of the loop.
        protocol.transport = transport
        return protocol


def encode_request(
    method: str,
    origin: Origin,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes | None,
) -> bytes:
    """Return the request line, headers and body as one buffer.

    Raise ValueError when the target or a header would break the message's framing. The
    router's HTTP parser already rejects such requests, so this is a second line of defence.
    """
    lines = [method.encode("ascii"), b" ", origin.prefix, target, b" HTTP/1.1\r\nhost: ",
             origin.authority, b"\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    # Every CR and LF in the head must be one of the line ends written here: the request line,
    # Host, each header, Content-Length when sent, and the empty line.
    line_ends = 3 + len(headers)
    if body:
        lines += (b"content-length: ", str(len(body)).encode(), b"\r\n")
        line_ends += 1
    elif method in _BODY_METHODS:
        lines.append(b"content-length: 0\r\n")
        line_ends += 1
    lines.append(b"\r\n")
    head = b"".join(lines)
    if b" " in target or head.count(b"\r") != line_ends or head.count(b"\n") != line_ends:
        raise ValueError("A request header or the target contains CR, LF or a space.")
    return head + body if body else head
