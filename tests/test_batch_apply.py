"""Batch apply: one poison entry in a batch fails alone, and the entries around it are acknowledged.

The poisons are real. In the write model, a trigger that an operator might have added rejects one
order with RAISE(ABORT), so that order's transaction fails with IntegrityError on every try. In the
read model, the poison order's key contains a string, so every projection of it fails with
WRONGTYPE.
"""

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import Engine, select, text

from services.cqrs.read_model import read_order
from services.cqrs.schema import applied_versions, open_write_model
from services.cqrs.settings import Settings
from services.cqrs.workers import cdc_ingest, projector
from services.cqrs.write_model import load_order
from services.shared.names import (
    CDC_STREAM,
    INGEST_GROUP,
    PROJECTOR_GROUP,
    apply_counts_key,
    dead_letter_stream,
    failure_counts_key,
    order_key,
)
from services.shared.streams import StreamConsumer, append, connect
from tests.chaos.support import order_state
from tests.cqrs_support import FAST_OPTIONS, consume_once, cqrs_settings, order_event

MAX_TRIES = FAST_OPTIONS.max_tries
DLQ = dead_letter_stream(CDC_STREAM)
ORDER_IDS = [f"o-batch-{index}" for index in range(5)]
POISON = ORDER_IDS[2]


@pytest.fixture
def settings(data_dir: Path, redis_url: str) -> Settings:
    return cqrs_settings(data_dir, redis_url, consumer_name="batcher")


@pytest.fixture
def engine(settings: Settings) -> Engine:
    return open_write_model(settings)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


async def append_batch(client: aioredis.Redis) -> dict[str, str]:
    """Append one created event per order, the poison in the middle; return order id -> entry
    id."""
    entries = {}
    for order_id in ORDER_IDS:
        event = order_event(order_state(order_id, user_id="bob"), action="created",
                            origin="monolith")
        entries[order_id] = await append(client, CDC_STREAM, event)
    return entries


def write_model_applies(engine: Engine, order_id: str) -> dict[int, int]:
    query = select(applied_versions.c.version, applied_versions.c.applies).where(
        applied_versions.c.aggregate_id == order_id
    )
    with engine.connect() as connection:
        return {row.version: row.applies for row in connection.execute(query)}


async def pending_ids(client: aioredis.Redis, group: str) -> list[str]:
    rows = await client.xpending_range(CDC_STREAM, group, min="-", max="+", count=100)
    return [str(row["message_id"]) for row in rows]


async def dead_letters(client: aioredis.Redis) -> list[dict[str, Any]]:
    entries: Any = await client.xrange(DLQ)
    return [fields for _entry_id, fields in entries]


async def consume_until_dead_lettered(consumer: StreamConsumer, client: aioredis.Redis) -> int:
    """Poll until the dead-letter stream has an entry; return the number of polls."""
    polls = 0
    while await client.xlen(DLQ) == 0:
        polls += 1
        assert polls <= MAX_TRIES + 1, "the poison entry was not dead-lettered"
        await consume_once(consumer)
    return polls


async def test_ingest_batch_isolates_poison(
    settings: Settings, engine: Engine, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    with engine.begin() as connection:
        connection.execute(text(
            f"CREATE TRIGGER reject_poison BEFORE INSERT ON orders WHEN NEW.id = '{POISON}' "
            "BEGIN SELECT RAISE(ABORT, 'order rejected by reject_poison'); END"
        ))
    entries = await append_batch(client)
    consumer = cdc_ingest.build_consumer(settings, client, engine, options=FAST_OPTIONS)

    with caplog.at_level(logging.WARNING):
        handled = await consume_once(consumer)

    assert "batch apply failed; applying its events one by one" in caplog.messages
    assert handled == len(ORDER_IDS) - 1
    assert await pending_ids(client, INGEST_GROUP) == [entries[POISON]]
    assert await client.hgetall(failure_counts_key(CDC_STREAM, INGEST_GROUP)) == {
        entries[POISON]: "1"
    }
    assert load_order(engine, POISON) is None
    for order_id in ORDER_IDS:
        if order_id != POISON:
            assert load_order(engine, order_id) == order_state(order_id, user_id="bob")
            assert write_model_applies(engine, order_id) == {1: 1}

    polls = await consume_until_dead_lettered(consumer, client)

    assert polls == MAX_TRIES - 1
    [dead] = await dead_letters(client)
    assert dead["dlq_entry_id"] == entries[POISON]
    assert dead["dlq_group"] == INGEST_GROUP
    assert dead["dlq_tries"] == str(MAX_TRIES)
    assert "order rejected by reject_poison" in dead["dlq_error"]
    assert await pending_ids(client, INGEST_GROUP) == []
    assert await client.exists(failure_counts_key(CDC_STREAM, INGEST_GROUP)) == 0
    for order_id in ORDER_IDS:
        if order_id != POISON:
            assert write_model_applies(engine, order_id) == {1: 1}


async def test_projector_batch_isolates_poison(
    settings: Settings, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await client.set(order_key(POISON), "not a hash")
    entries = await append_batch(client)
    consumer = projector.build_consumer(settings, client, options=FAST_OPTIONS)

    with caplog.at_level(logging.WARNING):
        handled = await consume_once(consumer)

    assert "batch projection failed; projecting its events one by one" in caplog.messages
    assert handled == len(ORDER_IDS) - 1
    assert await pending_ids(client, PROJECTOR_GROUP) == [entries[POISON]]
    assert await client.hgetall(failure_counts_key(CDC_STREAM, PROJECTOR_GROUP)) == {
        entries[POISON]: "1"
    }
    for order_id in ORDER_IDS:
        if order_id != POISON:
            assert await read_order(client, order_id) == order_state(order_id, user_id="bob")
            assert await client.hgetall(apply_counts_key("order", order_id)) == {"1": "1"}

    polls = await consume_until_dead_lettered(consumer, client)

    assert polls == MAX_TRIES - 1
    [dead] = await dead_letters(client)
    assert dead["dlq_entry_id"] == entries[POISON]
    assert dead["dlq_group"] == PROJECTOR_GROUP
    assert dead["dlq_tries"] == str(MAX_TRIES)
    assert "WRONGTYPE" in dead["dlq_error"]
    assert await pending_ids(client, PROJECTOR_GROUP) == []
    for order_id in ORDER_IDS:
        if order_id != POISON:
            assert await client.hgetall(apply_counts_key("order", order_id)) == {"1": "1"}
