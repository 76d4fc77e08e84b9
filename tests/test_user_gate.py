"""Per-user replication markers, through the real CDC relay, ingest and projector."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlalchemy import Engine

from services.cqrs.schema import open_write_model
from services.cqrs.settings import Settings as CqrsSettings
from services.cqrs.workers import cdc_ingest, projector
from services.monolith.schema import open_database
from services.monolith.settings import Settings as MonolithSettings
from services.monolith.store import insert_order, update_order_status
from services.monolith.workers.cdc_relay import relay_once
from services.shared.domain import OrderPublic
from services.shared.events import Event
from services.shared.names import (
    CDC_STREAM,
    GATE_PUBLISHED_KEY,
    INGEST_GROUP,
    PROJECTOR_GROUP,
    gate_applied_key,
)
from services.shared.streams import connect, parse_entry_id
from services.shared.user_gate import is_replicated, queue_raise_applied
from tests.cqrs_support import FAST_OPTIONS, consume_once, cqrs_settings


@pytest.fixture
def monolith(data_dir: Path, redis_url: str) -> Iterator[Engine]:
    settings = MonolithSettings(data_dir=data_dir / "monolith", redis_url=redis_url)
    engine = open_database(settings, seed=True)
    yield engine
    engine.dispose()


@pytest.fixture
def cqrs(data_dir: Path, redis_url: str) -> CqrsSettings:
    return cqrs_settings(data_dir / "cqrs", redis_url)


@pytest.fixture
def write_model(cqrs: CqrsSettings) -> Iterator[Engine]:
    engine = open_write_model(cqrs)
    yield engine
    engine.dispose()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


def place_order(engine: Engine, order_id: str, user_id: str) -> None:
    order = OrderPublic.model_validate({
        "id": order_id, "user_id": user_id,
        "items": [{"product_id": "prod-mouse", "quantity": 1, "unit_price": 2900}],
        "total_amount": 2900, "status": "pending", "version": 1,
        "created_at": "2026-01-31T12:00:00.000000Z", "updated_at": "2026-01-31T12:00:00.000000Z",
    })
    with engine.begin() as connection:
        insert_order(connection, order)


def pay_order(engine: Engine, order_id: str) -> None:
    with engine.begin() as connection:
        update_order_status(
            connection, order_id, status="paid", version=2,
            updated_at="2026-01-31T12:05:00.000000Z",
        )


async def last_order_entry(client: aioredis.Redis, user_id: str) -> str:
    """Return the id of the newest `cdc.monolith` entry about an order of `user_id`."""
    newest = None
    entries: list[tuple[str, dict[str, str]]] = await client.xrange(CDC_STREAM)  # type: ignore[assignment]
    for entry_id, fields in entries:
        event = Event.from_fields(fields)
        if event.aggregate == "order" and event.data["user_id"] == user_id:
            newest = entry_id
    assert newest is not None, f"no order entry of {user_id} on {CDC_STREAM}"
    return str(newest)


async def ingest(settings: CqrsSettings, client: aioredis.Redis, engine: Engine) -> int:
    consumer = cdc_ingest.build_consumer(settings, client, engine, options=FAST_OPTIONS)
    return await consume_once(consumer)


async def project(settings: CqrsSettings, client: aioredis.Redis) -> int:
    return await consume_once(projector.build_consumer(settings, client, options=FAST_OPTIONS))


async def test_replicated_after_both_groups_apply(
    monolith: Engine, cqrs: CqrsSettings, write_model: Engine, client: aioredis.Redis
) -> None:
    place_order(monolith, "o-1", "alice")
    await relay_once(monolith, client, batch_size=500)
    published = await client.hget(GATE_PUBLISHED_KEY, "alice")
    assert published == await last_order_entry(client, "alice")
    assert not await is_replicated(client, "alice")

    assert await ingest(cqrs, client, write_model) > 0
    assert await client.hget(gate_applied_key(INGEST_GROUP), "alice") == published
    # The read model has not caught up yet, so the user is still held back.
    assert not await is_replicated(client, "alice")

    assert await project(cqrs, client) > 0
    assert await client.hget(gate_applied_key(PROJECTOR_GROUP), "alice") == published
    assert await is_replicated(client, "alice")

    # A new change of the user raises the published marker past both applied markers.
    pay_order(monolith, "o-1")
    await relay_once(monolith, client, batch_size=500)
    newer = await client.hget(GATE_PUBLISHED_KEY, "alice")
    assert newer == await last_order_entry(client, "alice")
    assert parse_entry_id(newer) > parse_entry_id(published)
    assert not await is_replicated(client, "alice")

    await project(cqrs, client)
    assert not await is_replicated(client, "alice")
    await ingest(cqrs, client, write_model)
    assert await is_replicated(client, "alice")


async def test_markers_are_per_user_and_only_for_orders(
    monolith: Engine, client: aioredis.Redis
) -> None:
    place_order(monolith, "o-bob", "bob")
    await relay_once(monolith, client, batch_size=500)

    # The seeded users and products were published too, but only order entries set markers.
    assert await client.hgetall(GATE_PUBLISHED_KEY) == {
        "bob": await last_order_entry(client, "bob")
    }
    assert not await is_replicated(client, "bob")
    # A user with no order change published has nothing to wait for.
    assert await is_replicated(client, "alice")


async def test_applied_marker_never_moves_back(client: aioredis.Redis) -> None:
    for entry_id in ("1700000000000-5", "1700000000000-2", "999999999999-9", "1700000000000-10"):
        async with client.pipeline(transaction=True) as pipe:
            queue_raise_applied(pipe, INGEST_GROUP, "alice", entry_id)
            await pipe.execute()

    # Compared as (ms, seq) numbers: "-10" is after "-5", and a shorter ms is earlier.
    assert await client.hget(gate_applied_key(INGEST_GROUP), "alice") == "1700000000000-10"


async def test_lower_applied_marker_not_replicated(client: aioredis.Redis) -> None:
    await client.hset(GATE_PUBLISHED_KEY, "alice", "1700000000000-10")
    await client.hset(gate_applied_key(INGEST_GROUP), "alice", "1700000000000-10")
    await client.hset(gate_applied_key(PROJECTOR_GROUP), "alice", "1700000000000-9")
    assert not await is_replicated(client, "alice")

    await client.hset(gate_applied_key(PROJECTOR_GROUP), "alice", "1700000000001-0")
    assert await is_replicated(client, "alice")
