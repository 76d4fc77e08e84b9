"""The router's upstream HTTP client against scripted HTTP servers on loopback.

Each server is a real asyncio TCP server that reads the client's request and writes the response
bytes the test scripts. So the framing cases that well-behaved servers never produce are sent for
real: a body that breaks off, an interim response, a body ended by closing, and a connection
closed while a request was on its way. Every case runs on asyncio's loop and on uvloop's,
which the router uses; the two call `connection_made` at different times.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import uvloop

from services.router.upstream_client import (
    MAX_RESPONSE_HEAD_BYTES,
    Origin,
    OriginPool,
    UpstreamFailure,
    UpstreamResponse,
    encode_request,
)

LOOPS = ["asyncio", "uvloop"]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# What a scripted server does with the n-th request (from 0) on the m-th connection (from 0).
Script = Callable[[int, int, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class Scripted:
    """A loopback server that runs `script` for each request and records the requests."""

    script: Script
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = self.connections
        self.connections += 1
        self.writers.append(writer)
        number = 0
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                keep_open = await self.script(connection, number, writer)
                await writer.drain()
                number += 1
                if not keep_open:
                    break
        writer.close()


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[Scripted]:
    server = Scripted(script)
    server.server = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.server.close()
        for writer in server.writers:
            writer.close()
        # Lets the closed transports of both sides finish before the loop ends.
        await asyncio.sleep(0.05)
        await server.server.wait_closed()


def answer(data: bytes, *, keep_open: bool = True) -> Script:
    async def script(connection: int, number: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        return keep_open

    return script


def new_pool(url: str, *, limit: int = 10, read_timeout: float = 5.0) -> OriginPool:
    return OriginPool(
        Origin.parse(url), limit=limit, keepalive_seconds=4.0, connect_timeout=2.0,
        read_timeout=read_timeout,
    )


async def call(
    pool: OriginPool, method: str = "GET", body: bytes | None = None
) -> UpstreamResponse:
    request = encode_request(method, pool.origin, b"/orders?x=1", [(b"x-test", b"1")], body)
    return await pool.request(method, request)


async def whole(response: UpstreamResponse) -> tuple[list[bytes], bytes]:
    """Return the chunks as yielded and the body they make; check only the last ends it."""
    chunks: list[bytes] = []
    async with response:
        async for chunk, last in response.chunks():
            chunks.append(chunk)
            if last:
                break
        else:
            raise AssertionError("no chunk was marked as the last")
    return chunks, b"".join(chunks)


def run(loop: str, scenario: Callable[[], Awaitable[None]]) -> None:
    if loop == "uvloop":
        uvloop.run(scenario())
    else:
        asyncio.run(scenario())


@pytest.mark.parametrize("loop", LOOPS)
def test_reuses_kept_alive_connection(loop: str) -> None:
    async def scenario() -> None:
        async with scripted(answer(OK)) as server:
            pool = new_pool(server.url)
            for _ in range(3):
                response = await call(pool)
                assert response.status == 200
                assert (await whole(response))[1] == b"ok"
            assert server.connections == 1
            head = server.requests[0]
            assert head.startswith(b"GET /orders?x=1 HTTP/1.1\r\n")
            assert f"host: {server.url.removeprefix('http://')}\r\n".encode() in head
            assert b"x-test: 1\r\n" in head
            pool.close()

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_sends_body_with_its_length(loop: str) -> None:
    async def scenario() -> None:
        async with scripted(answer(OK)) as server:
            pool = new_pool(server.url)
            await whole(await call(pool, "POST", b"{\"a\": 1}"))
            await whole(await call(pool, "POST"))
            assert server.requests[0].endswith(b"content-length: 8\r\n\r\n{\"a\": 1}")
            assert server.requests[1].endswith(b"content-length: 0\r\n\r\n")
            pool.close()

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_streams_chunked_body(loop: str) -> None:
    async def script(connection: int, number: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for index in range(3):
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"6\r\npart-%d\r\n" % index)
        writer.write(b"0\r\n\r\n")
        return True

    async def scenario() -> None:
        async with scripted(script) as server:
            pool = new_pool(server.url)
            chunks, body = await whole(await call(pool))
            assert body == b"part-0part-1part-2"
            assert len(chunks) >= 3  # the parts came as they arrived, not all at the end
            await whole(await call(pool))
            assert server.connections == 1
            pool.close()

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_body_ended_by_close(loop: str) -> None:
    async def scenario() -> None:
        data = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"
        async with scripted(answer(data, keep_open=False)) as server:
            pool = new_pool(server.url)
            assert (await whole(await call(pool)))[1] == b"until the end"
            assert (await whole(await call(pool)))[1] == b"until the end"
            assert server.connections == 2
            pool.close()

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_head_response_ends_at_its_head(loop: str) -> None:
    async def scenario() -> None:
        data = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        async with scripted(answer(data)) as server:
            pool = new_pool(server.url, read_timeout=2.0)
            started = time.monotonic()
            response = await call(pool, "HEAD")
            assert response.header(b"content-length") == "1000"
            assert (await whole(response))[1] == b""
            assert time.monotonic() - started < 1.0
            pool.close()

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_no_content_and_interim_responses(loop: str) -> None:
    async def script(connection: int, number: int, writer: asyncio.StreamWriter) -> bool:
        if number == 0:
            writer.write(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)
        return True

    async def scenario() -> None:
        async with scripted(script) as server:
            pool = new_pool(server.url)
            empty = await call(pool)
            assert (empty.status, await whole(empty)) == (204, ([b""], b""))
            final = await call(pool)
            assert final.status == 200
            assert final.header(b"link") == ""  # the interim response's headers are dropped
            assert (await whole(final))[1] == b"ok"
            assert server.connections == 1
            pool.close()

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_head_timeout(loop: str) -> None:
    async def silent(connection: int, number: int, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    async def scenario() -> None:
        async with scripted(silent) as server:
            pool = new_pool(server.url, read_timeout=0.3)
            started = time.monotonic()
            with pytest.raises(UpstreamFailure) as failure:
                await call(pool)
            assert failure.value.kind == "timeout"
            assert "response head" in str(failure.value)
            assert 0.25 < time.monotonic() - started < 2.0
            pool.close()

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_body_timeout_and_break(loop: str) -> None:
    async def script(connection: int, number: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        if connection == 0:
            await writer.drain()
            await asyncio.sleep(5)  # stalls
        return False  # closes mid-body

    async def scenario() -> None:
        async with scripted(script) as server:
            pool = new_pool(server.url, read_timeout=0.3)
            with pytest.raises(UpstreamFailure) as stalled:
                await whole(await call(pool))
            assert stalled.value.kind == "timeout"
            with pytest.raises(UpstreamFailure) as broken:
                await whole(await call(pool))
            assert broken.value.kind == "protocol"
            pool.close()

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    "data",
    [
        b"this is not HTTP\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_RESPONSE_HEAD_BYTES + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    ],
    ids=["garbage", "switching-protocols", "huge-head", "two-lengths"],
)
def test_invalid_responses_fail_as_protocol(loop: str, data: bytes) -> None:
    async def scenario() -> None:
        async with scripted(answer(data)) as server:
            pool = new_pool(server.url)
            with pytest.raises(UpstreamFailure) as failure:
                await whole(await call(pool))
            assert failure.value.kind == "protocol"
            pool.close()

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_closed_kept_alive_connection(loop: str) -> None:
    """A request that meets a kept-alive connection closing is sent again only when safe."""

    async def script(connection: int, number: int, writer: asyncio.StreamWriter) -> bool:
        if number == 1:
            return False  # closes as the second request arrives, without a response
        writer.write(OK)
        return True

    async def scenario() -> None:
        async with scripted(script) as server:
            pool = new_pool(server.url)
            await whole(await call(pool))
            assert (await whole(await call(pool, "GET")))[1] == b"ok"
            assert server.connections == 2
            with pytest.raises(UpstreamFailure) as failure:
                await call(pool, "POST", b"{}")
            assert failure.value.kind == "protocol"
            assert server.connections == 2
            pool.close()

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_bytes_after_response_ignored(loop: str) -> None:
    """A second response to one request neither changes the first nor leaves the connection open."""

    async def scenario() -> None:
        second = b"HTTP/1.1 500 Injected\r\nX-Injected: 1\r\nContent-Length: 0\r\n\r\n"
        async with scripted(answer(OK + second)) as server:
            pool = new_pool(server.url)
            response = await call(pool)
            assert response.status == 200
            assert response.header(b"x-injected") == ""
            assert (await whole(response))[1] == b"ok"
            await whole(await call(pool))
            assert server.connections == 2
            pool.close()

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_timeout_not_sent_again(loop: str) -> None:
    async def script(connection: int, number: int, writer: asyncio.StreamWriter) -> bool:
        if number == 1:
            await asyncio.sleep(1)  # slower than the read timeout
        writer.write(OK)
        return True

    async def scenario() -> None:
        async with scripted(script) as server:
            pool = new_pool(server.url, read_timeout=0.3)
            await whole(await call(pool))
            with pytest.raises(UpstreamFailure) as failure:
                await call(pool)
            assert failure.value.kind == "timeout"
            assert len(server.requests) == 2
            pool.close()

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_connect_failure(loop: str) -> None:
    async def scenario() -> None:
        async with scripted(answer(OK)) as server:
            url = server.url
        pool = new_pool(url)  # nothing listens there any more
        with pytest.raises(UpstreamFailure) as failure:
            await call(pool)
        assert failure.value.kind == "connect"
        assert url.removeprefix("http://") in str(failure.value)

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_connection_limit_queues_requests(loop: str) -> None:
    async def slow(connection: int, number: int, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.1)
        writer.write(OK)
        return True

    async def scenario() -> None:
        async with scripted(slow) as server:
            pool = new_pool(server.url, limit=1)

            async def one() -> bytes:
                return (await whole(await call(pool)))[1]

            assert await asyncio.gather(*(one() for _ in range(4))) == [b"ok"] * 4
            assert server.connections == 1
            pool.close()

    run(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_large_body_with_slow_reader(loop: str) -> None:
    """Reading pauses while the reader is behind, and a pause is not an upstream timeout."""
    body = bytes(range(256)) * 8192  # 2 MiB

    async def scenario() -> None:
        data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        async with scripted(answer(data)) as server:
            pool = new_pool(server.url, read_timeout=0.2)
            received = bytearray()
            async with await call(pool) as response:
                async for chunk, _ in response.chunks():
                    received += chunk
                    if len(received) < 1024 * 1024:
                        await asyncio.sleep(0.3)
            assert received == body
            pool.close()

    run(loop, scenario)


def test_encode_request_refuses_framing_characters() -> None:
    origin = Origin.parse("http://upstream.test:8001/base")
    request = encode_request("GET", origin, b"/a", [(b"x-a", b"1")], None)
    assert request == b"GET /base/a HTTP/1.1\r\nhost: upstream.test:8001\r\nx-a: 1\r\n\r\n"
    for headers, target in (
        ([(b"x-a", b"1\r\nx-injected: 1")], b"/a"),
        ([(b"x-a", b"1\nx-injected: 1")], b"/a"),
        ([(b"x-a", b"1\r")], b"/a"),
        ([], b"/a HTTP/1.1\r\nx-injected: 1\r\n\r\nGET /b"),
        ([], b"/a b"),
    ):
        with pytest.raises(ValueError, match="CR, LF or a space"):
            encode_request("GET", origin, target, headers, None)


def test_origin_parse() -> None:
    assert Origin.parse("https://cqrs.example:8443/api") == Origin(
        "cqrs.example", 8443, True, b"cqrs.example:8443", b"/api"
    )
    assert Origin.parse("http://monolith").port == 80
    with pytest.raises(ValueError, match="not an http"):
        Origin.parse("ftp://monolith")
