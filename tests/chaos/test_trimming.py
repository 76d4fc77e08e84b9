"""Stream trimming: never an entry that a group has not acknowledged, and bounded when consumed."""

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.shared.streams import connect, parse_entry_id, trim_acknowledged

STREAM = "trim.test"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


async def fill(client: aioredis.Redis, count: int) -> list[str]:
    return [str(await client.xadd(STREAM, {"n": str(index)})) for index in range(count)]


async def read(client: aioredis.Redis, group: str, count: int) -> list[str]:
    reply = await client.xreadgroup(group, "c1", {STREAM: ">"}, count=count)
    return [entry_id for entry_id, _fields in reply[0][1]] if reply else []


async def test_trim_keeps_oldest_pending(client: aioredis.Redis) -> None:
    ids = await fill(client, 10)
    await client.xgroup_create(STREAM, "fast", id="0")
    await client.xgroup_create(STREAM, "slow", id="0")
    await client.xack(STREAM, "fast", *await read(client, "fast", 10))
    slow = await read(client, "slow", 6)
    await client.xack(STREAM, "slow", slow[0], slow[1], slow[2], slow[4], slow[5])

    removed = await trim_acknowledged(client, STREAM, ("fast", "slow"))

    # slow's fourth entry is still pending, so it and everything after it stay.
    assert removed == 3
    assert [entry_id for entry_id, _ in await client.xrange(STREAM)] == ids[3:]


async def test_trim_keeps_undelivered(client: aioredis.Redis) -> None:
    ids = await fill(client, 5)
    await client.xgroup_create(STREAM, "fast", id="0")
    await client.xgroup_create(STREAM, "idle", id="0")
    await client.xack(STREAM, "fast", *await read(client, "fast", 5))

    assert await trim_acknowledged(client, STREAM, ("fast", "idle")) == 0
    assert await client.xlen(STREAM) == len(ids)


async def test_trim_creates_missing_group(client: aioredis.Redis) -> None:
    # The second group's consumer has never started; its entries must still be there for it.
    await fill(client, 4)
    await client.xgroup_create(STREAM, "started", id="0")
    await client.xack(STREAM, "started", *await read(client, "started", 4))

    assert await trim_acknowledged(client, STREAM, ("started", "not-started")) == 0

    assert len(await read(client, "not-started", 10)) == 4


async def test_trim_counts_unknown_groups(client: aioredis.Redis) -> None:
    # A group that is not in the list still keeps its entries.
    await fill(client, 4)
    await client.xgroup_create(STREAM, "known", id="0")
    await client.xgroup_create(STREAM, "operator", id="0")
    await client.xack(STREAM, "known", *await read(client, "known", 4))

    assert await trim_acknowledged(client, STREAM, ("known",)) == 0
    assert await client.xlen(STREAM) == 4


async def test_trim_bounded_in_steady_state(client: aioredis.Redis) -> None:
    groups = ("a", "b")
    for group in groups:
        await client.xgroup_create(STREAM, group, id="0", mkstream=True)
    lengths = []
    for _round in range(50):
        await fill(client, 20)
        for group in groups:
            await client.xack(STREAM, group, *await read(client, group, 20))
        await trim_acknowledged(client, STREAM, groups)
        lengths.append(await client.xlen(STREAM))

    # The last delivered entry of each group stays, so at most one entry remains per round.
    assert max(lengths) <= 1


async def test_trim_keeps_recent_entries(client: aioredis.Redis) -> None:
    seconds, _microseconds = await client.time()
    old_ids = [str(await client.xadd(STREAM, {"n": str(index)}, id=f"{index + 1}-0"))
               for index in range(3)]
    recent_ids = await fill(client, 3)
    await client.xgroup_create(STREAM, "g", id="0")
    await client.xack(STREAM, "g", *await read(client, "g", 6))

    removed = await trim_acknowledged(client, STREAM, ("g",), retention_seconds=60)

    # Everything is acknowledged, but the entries appended within the last minute stay.
    assert seconds > 60
    assert removed == len(old_ids)
    assert [entry_id for entry_id, _ in await client.xrange(STREAM)] == recent_ids


def test_parse_entry_id_orders_like_redis() -> None:
    ids = ["1700000000000-10", "1700000000000-9", "999-0", "1700000000001-0"]

    assert sorted(ids, key=parse_entry_id) == [
        "999-0", "1700000000000-9", "1700000000000-10", "1700000000001-0",
    ]


class AckingBetweenCalls(aioredis.Redis):
    """A client after whose XINFO GROUPS reply a consumer acknowledges all it has pending, as a
    live consumer may do between the trim's two reads."""

    async def xinfo_groups(self, name: Any) -> Any:
        reply = await super().xinfo_groups(name)
        for info in reply:
            rows = await self.xpending_range(name, info["name"], min="-", max="+", count=100)
            if rows:
                await self.xack(name, info["name"], *[row["message_id"] for row in rows])
        return reply


@pytest.fixture
async def acking_client(redis_url: str) -> AsyncIterator[AckingBetweenCalls]:
    client = AckingBetweenCalls.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def test_trim_group_acked_meanwhile(acking_client: AckingBetweenCalls) -> None:
    ids = await fill(acking_client, 6)
    await acking_client.xgroup_create(STREAM, "g", id="0")
    await read(acking_client, "g", 4)

    removed = await trim_acknowledged(acking_client, STREAM, ("g",))

    # XINFO saw 4 pending; by XPENDING none were left, so the last delivered entry is the floor.
    assert removed == 3
    assert [entry_id for entry_id, _ in await acking_client.xrange(STREAM)] == ids[3:]
