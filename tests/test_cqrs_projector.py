"""Projector: both streams fill the Redis read model by version, whatever the delivery order."""

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from services.cqrs.read_model import list_user_orders, project_event, read_order
from services.cqrs.settings import Settings
from services.cqrs.workers import projector
from services.shared.consistency import Decision, content_hash
from services.shared.domain import DEMO_PRODUCTS
from services.shared.events import Event
from services.shared.names import (
    CDC_STREAM,
    CQRS_STREAM,
    PROJECTOR_GROUP,
    order_key,
    product_key,
    products_index_key,
    user_orders_key,
)
from services.shared.streams import append, connect
from tests.cqrs_support import FAST_OPTIONS, consume_once, cqrs_settings, order_event, product_event


@pytest.fixture
def settings(data_dir: Path, redis_url: str) -> Settings:
    return cqrs_settings(data_dir, redis_url)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator["redis.Redis"]:
    client = connect(redis_url)
    yield client
    await client.aclose()


def order_state(
    order_id: str, version: int, status: str = "pending", **changes: Any
) -> dict[str, Any]:
    state = {
        "id": order_id, "user_id": "alice",
        "items": [{"product_id": "prod-mouse", "quantity": 1, "unit_price": 2900}],
        "total_amount": 2900, "status": status, "version": version,
        "created_at": "2026-01-31T12:00:00.000000Z",
        "updated_at": f"2026-01-31T12:00:0{version}.000000Z",
    }
    state.update(changes)
    return state


async def project_streams(settings: Settings, client: "redis.Redis") -> int:
    return await consume_once(projector.build_consumer(settings, client, options=FAST_OPTIONS))


async def test_projector_orders_from_both_streams(
    settings: Settings, client: "redis.Redis"
) -> None:
    from_cqrs = order_state("o-cqrs", 1, created_at="2026-01-31T12:00:00.000000Z")
    from_monolith = order_state("o-mono", 1, created_at="2026-01-31T13:00:00.000000Z")
    await append(client, CQRS_STREAM, order_event(from_cqrs, action="created", origin="cqrs"))
    await append(
        client, CDC_STREAM, order_event(from_monolith, action="created", origin="monolith")
    )

    assert await project_streams(settings, client) == 2

    stored = await client.hgetall(order_key("o-cqrs"))
    assert json.loads(stored["json"]) == from_cqrs
    assert stored["version"] == "1"
    assert stored["hash"] == content_hash(from_cqrs)
    orders = await list_user_orders(client, "alice")
    assert [order["id"] for order in orders] == ["o-mono", "o-cqrs"]
    score = await client.zscore(user_orders_key("alice"), "o-mono")
    assert score == pytest.approx(1_769_864_400.0)


async def test_projector_reordered_versions(settings: Settings, client: "redis.Redis") -> None:
    version_two = order_state("o1", 2, "paid")
    await append(client, CQRS_STREAM, order_event(version_two, action="paid", origin="cqrs"))
    await append(client, CQRS_STREAM, order_event(order_state("o1", 1), action="created",
                                                  origin="cqrs"))

    await project_streams(settings, client)

    assert await read_order(client, "o1") == version_two
    pending = await client.xpending(CQRS_STREAM, PROJECTOR_GROUP)
    assert pending["pending"] == 0


async def test_projector_parallel_never_regresses(redis_url: str) -> None:
    events = [
        order_event(order_state("o1", version, "paid" if version > 1 else "pending"),
                    action="updated", origin="cqrs")
        for version in range(1, 31)
    ]
    random.Random(7).shuffle(events)
    clients = [connect(redis_url) for _ in range(4)]

    async def project_share(index: int) -> None:
        for event in events[index::4]:
            await project_event(clients[index], event, authority="monolith")

    await asyncio.gather(*(project_share(index) for index in range(4)))

    stored = await read_order(clients[0], "o1")
    for client in clients:
        await client.aclose()
    assert stored is not None
    assert stored["version"] == 30


async def test_projector_conflict_follows_authority(client: "redis.Redis") -> None:
    paid_on_cqrs = order_event(order_state("o1", 2, "paid"), action="paid", origin="cqrs")
    cancelled_on_monolith = order_event(
        order_state("o1", 2, "cancelled"), action="updated", origin="monolith"
    )

    assert await project_event(client, paid_on_cqrs, authority="monolith") is Decision.APPLY
    decision = await project_event(client, cancelled_on_monolith, authority="monolith")
    assert decision is Decision.CONFLICT_APPLY
    stored = await read_order(client, "o1")
    assert stored is not None
    assert stored["status"] == "cancelled"

    decision = await project_event(client, paid_on_cqrs, authority="monolith")
    assert decision is Decision.CONFLICT_KEEP
    stored = await read_order(client, "o1")
    assert stored is not None
    assert stored["status"] == "cancelled"


async def test_projector_deletes_keys(client: "redis.Redis") -> None:
    keyboard = DEMO_PRODUCTS[0]
    state = order_state("o1", 3)
    await project_event(client, order_event(state, action="updated", origin="monolith"),
                        authority="monolith")
    await project_event(client, product_event(keyboard, version=2), authority="monolith")

    older = await project_event(client, product_event(keyboard, version=1, action="deleted"),
                                authority="monolith")
    assert older is Decision.STALE
    assert await client.exists(product_key(keyboard["id"])) == 1

    for event in (order_event(state, action="deleted", origin="monolith"),
                  product_event(keyboard, version=2, action="deleted")):
        assert await project_event(client, event, authority="monolith") is Decision.APPLY

    assert await client.exists(order_key("o1")) == 0
    assert await client.zcard(user_orders_key("alice")) == 0
    assert await client.exists(product_key(keyboard["id"])) == 0
    assert await client.scard(products_index_key()) == 0


async def test_projector_skips_users(settings: Settings, client: "redis.Redis") -> None:
    user = Event.for_aggregate(
        source="/monolith/cdc", aggregate="user", aggregate_id="alice", action="updated",
        state={"id": "alice", "username": "alice", "display_name": "Alice", "version": 2,
               "updated_at": "2026-01-31T12:00:00.000000Z"},
        origin="monolith",
    )
    await append(client, CDC_STREAM, user)

    assert await project_streams(settings, client) == 1
    assert await client.keys("rm:*") == []


async def test_projector_group_after_entries(settings: Settings, client: "redis.Redis") -> None:
    # The entries exist before the projector's group does. A group created at id 0 still reads them.
    for version in (1, 2):
        state = order_state("o1", version)
        await append(client, CQRS_STREAM, order_event(state, action="updated", origin="cqrs"))
    assert await client.exists(CDC_STREAM) == 0

    assert await project_streams(settings, client) == 2
    stored = await read_order(client, "o1")
    assert stored is not None
    assert stored["version"] == 2


async def test_projector_run_until_stopped(settings: Settings, client: "redis.Redis") -> None:
    await append(client, CQRS_STREAM, order_event(order_state("o1", 1), action="created",
                                                  origin="cqrs"))
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run(settings, stop))

    for _ in range(200):
        if await read_order(client, "o1") is not None:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, timeout=3)

    assert await read_order(client, "o1") is not None
