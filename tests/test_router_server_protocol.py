"""The router's write-coalescing transport, on a real loopback TCP connection.

The peer is a real socket. `Counting` wraps the real transport only to count the write calls
that reach it, because the number of those calls is what the coalescing changes.
"""

import asyncio
import socket
from typing import Any

from services.router.server_protocol import CoalescingTransport


class Counting:
    """Forwards to a real transport and records each write that reaches it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def connected() -> tuple[Counting, socket.socket]:
    """Return a counted client transport and the server side's socket of one connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        transport, _ = await asyncio.get_running_loop().create_connection(
            asyncio.Protocol, "127.0.0.1", port
        )
        peer, _ = listener.accept()
    return Counting(transport), peer


def received(peer: socket.socket, size: int) -> bytes:
    peer.settimeout(2)
    data = b""
    while len(data) < size:
        chunk = peer.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_writes_of_one_step_leave_together() -> None:
    async def scenario() -> None:
        counting, peer = await connected()
        coalescing = CoalescingTransport(counting, asyncio.get_running_loop())  # type: ignore[arg-type]
        coalescing.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        coalescing.write(b"ok")
        assert counting.writes == []
        assert coalescing.get_write_buffer_size() == 40
        await asyncio.sleep(0)
        assert counting.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]

        coalescing.write(b"second")
        await asyncio.sleep(0)
        coalescing.write(b"third")
        await asyncio.sleep(0)
        assert counting.writes[1:] == [b"second", b"third"]

        coalescing.write(b"before close")
        coalescing.close()  # sends what is buffered first
        assert counting.writes[-1] == b"before close"
        expected = b"".join(counting.writes)
        assert received(peer, len(expected)) == expected
        peer.close()
        await asyncio.sleep(0.01)  # lets the closed transport finish before the loop ends

    asyncio.run(scenario())


def test_abort_drops_buffered_writes() -> None:
    async def scenario() -> None:
        counting, peer = await connected()
        coalescing = CoalescingTransport(counting, asyncio.get_running_loop())  # type: ignore[arg-type]
        coalescing.write(b"never sent")
        coalescing.abort()
        await asyncio.sleep(0.05)
        assert counting.writes == []
        assert received(peer, 1) == b""
        assert coalescing.is_closing()
        peer.close()
        await asyncio.sleep(0.01)  # lets the closed transport finish before the loop ends

    asyncio.run(scenario())
