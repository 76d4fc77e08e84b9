"""The router's buffered access log, written to a real pipe."""

import asyncio
import json
import logging
import os
from collections.abc import Iterator

import pytest

from services.router.access_log import ACCESS_LOGGER, FLUSH_SECONDS, PIPE_BUF, AccessLog


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


@pytest.fixture
def info_level() -> Iterator[None]:
    logger = logging.getLogger(ACCESS_LOGGER)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(previous)


def read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.usefixtures("info_level")
async def test_access_log_writes_json_lines_after_delay(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    access = AccessLog("router", enabled=True, fd=write_end)

    access.write({"method": "GET", "path": "/orders", "status": 200, "error": None})
    assert read_all(read_end) == b""
    await asyncio.sleep(FLUSH_SECONDS * 3)

    (line,) = read_all(read_end).decode().splitlines()
    record = json.loads(line)
    assert record["level"] == "INFO"
    assert record["logger"] == ACCESS_LOGGER
    assert record["message"] == "request served"
    assert record["service"] == "router"
    assert record["path"] == "/orders"
    assert record["status"] == 200
    assert record["time"].endswith("+00:00")


@pytest.mark.usefixtures("info_level")
async def test_access_log_flush_keeps_lines_whole(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    read_end, write_end = pipe
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes | memoryview) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    access = AccessLog("router", enabled=True, fd=write_end)
    for number in range(40):
        access.write({"request_id": f"r{number}", "path": "/orders/" + "x" * 100})
    access.flush()

    lines = read_all(read_end).decode().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [f"r{n}" for n in range(40)]
    assert len(writes) > 1
    assert max(writes) <= PIPE_BUF


async def test_access_log_off_below_info(pipe: tuple[int, int]) -> None:
    logger = logging.getLogger(ACCESS_LOGGER)
    previous = logger.level
    logger.setLevel(logging.WARNING)
    try:
        assert not AccessLog("router", enabled=True, fd=pipe[1]).enabled
    finally:
        logger.setLevel(previous)


@pytest.mark.usefixtures("info_level")
def test_access_log_setting_turns_it_off(pipe: tuple[int, int]) -> None:
    assert AccessLog("router", enabled=True, fd=pipe[1]).enabled
    assert not AccessLog("router", enabled=False, fd=pipe[1]).enabled
