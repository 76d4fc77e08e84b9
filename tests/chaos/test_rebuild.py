"""Read model rebuild while the projector runs: queries see the old or the new model, not a mix."""

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import Engine

from services.cli.main import build_parser
from services.cqrs.commands import create_order, transition_order
from services.cqrs.read_model import (
    list_products,
    list_user_orders,
    project_event,
    read_order,
    stage_state,
)
from services.cqrs.rebuild import RebuildError, rebuild_read_model
from services.cqrs.schema import open_write_model
from services.cqrs.settings import Settings
from services.cqrs.workers import cdc_ingest, outbox_relay, projector
from services.cqrs.write_model import list_orders
from services.cqrs.write_model import list_products as write_model_products
from services.shared.consistency import Decision
from services.shared.domain import DEMO_PRODUCTS, OrderCreate
from services.shared.names import (
    CDC_STREAM,
    READ_MODEL_REBUILD_KEY,
    order_key,
    user_orders_key,
)
from services.shared.streams import append, connect
from tests.chaos.support import order_state
from tests.cqrs_support import FAST_OPTIONS, consume_once, cqrs_settings, order_event, seed_products

ORDERS_PER_USER = 60
USERS = ("alice", "bob")


@pytest.fixture
def settings(data_dir: Path, redis_url: str) -> Settings:
    return cqrs_settings(data_dir, redis_url, retry_base_seconds=0.02, retry_max_seconds=0.1)


@pytest.fixture
def engine(settings: Settings) -> Engine:
    engine = open_write_model(settings)
    seed_products(engine)
    return engine


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


def place_orders(engine: Engine) -> dict[str, list[str]]:
    request = OrderCreate.model_validate({"items": [{"product_id": "prod-mouse", "quantity": 1}]})
    return {
        user: [create_order(engine, user_id=user, request=request)["id"]
               for _ in range(ORDERS_PER_USER)]
        for user in USERS
    }


async def project_everything(settings: Settings, engine: Engine, client: aioredis.Redis) -> None:
    while await outbox_relay.relay_once(engine, client, batch_size=500):
        pass
    consumer = projector.build_consumer(settings, client, options=FAST_OPTIONS)
    while await consume_once(consumer):
        pass


async def product_states(client: aioredis.Redis) -> list[dict[str, Any]]:
    return await list_products(client)


async def assert_matches_write_model(engine: Engine, client: aioredis.Redis) -> None:
    for user in USERS:
        assert await list_user_orders(client, user) == list_orders(engine, user)
    assert await product_states(client) == write_model_products(engine)


async def test_rebuild_replaces_damaged_model(
    settings: Settings, engine: Engine, client: aioredis.Redis
) -> None:
    orders = place_orders(engine)
    await project_everything(settings, engine, client)
    damaged = orders["alice"][:20]
    await client.delete(*[order_key(order_id) for order_id in damaged])
    await client.hset(order_key(orders["bob"][0]), mapping={"json": "{}", "version": 99})
    await client.hset(order_key("ghost"), mapping={"json": "{}", "version": 1})
    await client.zadd(user_orders_key("alice"), {"ghost": 1.0})
    await client.set("rm-staging:dead-rebuild:order:x", "left by a rebuild that died")

    result = await rebuild_read_model(engine, client, authority="monolith")

    await assert_matches_write_model(engine, client)
    assert await client.exists(order_key("ghost")) == 0
    assert await client.keys("rm-staging:*") == []
    assert await client.exists(READ_MODEL_REBUILD_KEY) == 0
    assert result.orders == ORDERS_PER_USER * len(USERS)
    assert result.products == len(DEMO_PRODUCTS)


async def test_queries_see_old_or_new_model(
    settings: Settings, engine: Engine, client: aioredis.Redis
) -> None:
    orders = place_orders(engine)
    await project_everything(settings, engine, client)
    await client.delete(*[order_key(order_id) for order_id in orders["alice"][:25]])
    await client.zrem(user_orders_key("alice"), *orders["alice"][:25])
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(projector.run(settings, stop)),
        asyncio.create_task(outbox_relay.run(settings, stop)),
    ]
    seen: list[int] = []
    reading = asyncio.Event()

    async def read_repeatedly() -> None:
        reader = connect(settings.redis_url)
        while not reading.is_set():
            seen.append(len(await list_user_orders(reader, "alice")))
            await asyncio.sleep(0)
        await reader.aclose()

    async def pay_meanwhile() -> list[str]:
        paid = []
        for order_id in orders["bob"][:30]:
            await asyncio.to_thread(transition_order, engine, order_id=order_id,
                                    user_id="bob", action="pay")
            paid.append(order_id)
            await asyncio.sleep(0.005)
        return paid

    reader_task = asyncio.create_task(read_repeatedly())
    payer = asyncio.create_task(pay_meanwhile())
    await asyncio.sleep(0.05)
    await rebuild_read_model(engine, client, authority="monolith")
    paid = await payer
    await asyncio.sleep(0.05)
    reading.set()
    await reader_task

    # Wait for the projector to catch up with the payments made after the switch.
    for _attempt in range(200):
        states = [await read_order(client, order_id) for order_id in paid]
        if all(state and state["status"] == "paid" for state in states):
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.gather(*workers)

    assert seen
    assert set(seen) <= {ORDERS_PER_USER - 25, ORDERS_PER_USER}, sorted(set(seen))
    assert seen[-1] == ORDERS_PER_USER
    await assert_matches_write_model(engine, client)


async def test_rebuild_waits_for_ingest(
    settings: Settings, engine: Engine, client: aioredis.Redis
) -> None:
    # The projector applied a monolith order that ingest has not written to the write model yet.
    state = order_state("o-mono", user_id="bob")
    await append(client, CDC_STREAM, order_event(state, action="created", origin="monolith"))
    await consume_once(projector.build_consumer(settings, client, options=FAST_OPTIONS))
    assert await read_order(client, "o-mono") == state

    with pytest.raises(RebuildError, match="CDC ingest did not acknowledge"):
        await rebuild_read_model(engine, client, authority="monolith", ingest_wait_seconds=0.3)

    assert await read_order(client, "o-mono") == state
    assert await client.exists(READ_MODEL_REBUILD_KEY) == 0
    assert await client.keys("rm-staging:*") == []

    async def ingest_later() -> None:
        await asyncio.sleep(0.2)
        consumer = cdc_ingest.build_consumer(settings, client, engine, options=FAST_OPTIONS)
        await consume_once(consumer)

    ingest = asyncio.create_task(ingest_later())
    await rebuild_read_model(engine, client, authority="monolith", ingest_wait_seconds=10)
    await ingest

    assert await read_order(client, "o-mono") == state


async def test_second_rebuild_rejected(engine: Engine, client: aioredis.Redis) -> None:
    await client.set(READ_MODEL_REBUILD_KEY, "rm-staging:other", ex=60)

    with pytest.raises(RebuildError, match="rm-staging:other"):
        await rebuild_read_model(engine, client, authority="monolith")

    assert await client.get(READ_MODEL_REBUILD_KEY) == "rm-staging:other"


async def test_deletion_during_rebuild_kept(client: aioredis.Redis) -> None:
    state = order_state("o1", user_id="bob", version=2)
    await project_event(client, order_event(state, action="updated", origin="monolith"),
                        authority="monolith")
    await client.set(READ_MODEL_REBUILD_KEY, "rm-staging:t", ex=60)

    deleted = await project_event(
        client, order_event(state, action="deleted", origin="monolith"), authority="monolith"
    )

    assert deleted is Decision.APPLY
    assert await client.exists(order_key("o1")) == 0
    assert await client.hgetall(order_key("o1", "rm-staging:t")) == {"version": "2",
                                                                     "deleted": "1"}
    # A snapshot taken before ingest applied the deletion must not bring the order back.
    stale = await stage_state(client, "rm-staging:t", "order", state, origin="monolith",
                              authority="monolith")
    assert stale is Decision.STALE
    newer = await stage_state(client, "rm-staging:t", "order", {**state, "version": 3},
                              origin="monolith", authority="monolith")
    assert newer is Decision.APPLY
    stored = await client.hgetall(order_key("o1", "rm-staging:t"))
    assert "deleted" not in stored
    assert json.loads(stored["json"])["version"] == 3


def test_projections_cli_rebuilds(
    data_dir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = cqrs_settings(data_dir, redis_url)
    engine = open_write_model(settings)
    seed_products(engine)
    monkeypatch.setenv("ZTCQRS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("REDIS_URL", redis_url)

    args = build_parser().parse_args(["projections", "rebuild", "--ingest-wait-seconds", "5"])
    assert args.handler(args) == 0

    output = capsys.readouterr().out
    assert "read model rebuilt" in output
    assert f"0 orders and {len(DEMO_PRODUCTS)} products" in output
    engine.dispose()
