"""Outbox relay: outbox rows reach `events.cqrs` in order, once per round, behind a checkpoint."""

import asyncio
from pathlib import Path

import pytest
from redis import exceptions as redis_errors
from sqlalchemy import Engine, select

from services.cqrs.commands import create_order, transition_order
from services.cqrs.schema import open_write_model, outbox
from services.cqrs.settings import Settings
from services.cqrs.workers import outbox_relay
from services.cqrs.workers.outbox_relay import read_checkpoint, relay_once
from services.shared.domain import OrderCreate
from services.shared.events import Event
from services.shared.names import CQRS_STREAM
from services.shared.streams import connect
from tests.conftest import free_port
from tests.cqrs_support import cqrs_settings, seed_products


@pytest.fixture
def settings(data_dir: Path, redis_url: str) -> Settings:
    return cqrs_settings(data_dir, redis_url)


@pytest.fixture
def engine(settings: Settings) -> Engine:
    engine = open_write_model(settings)
    seed_products(engine)
    return engine


def new_order(engine: Engine, user_id: str = "alice") -> str:
    request = OrderCreate.model_validate({"items": [{"product_id": "prod-mouse", "quantity": 1}]})
    order_id: str = create_order(engine, user_id=user_id, request=request)["id"]
    return order_id


async def stream_events(redis_url: str) -> list[Event]:
    client = connect(redis_url)
    try:
        entries = await client.xrange(CQRS_STREAM)
    finally:
        await client.aclose()
    return [Event.from_fields(fields) for _entry_id, fields in entries]


async def test_relay_publishes_once_and_checkpoints(engine: Engine, redis_url: str) -> None:
    order_id = new_order(engine)
    transition_order(engine, order_id=order_id, user_id="alice", action="pay")
    second = new_order(engine, "bob")
    client = connect(redis_url)

    assert await relay_once(engine, client, batch_size=100) == 3
    assert read_checkpoint(engine) == 3
    assert await relay_once(engine, client, batch_size=100) == 0
    await client.aclose()

    events = await stream_events(redis_url)
    assert [(event.aggregate_id, event.type) for event in events] == [
        (order_id, "ztcqrs.order.created"),
        (order_id, "ztcqrs.order.paid"),
        (second, "ztcqrs.order.created"),
    ]
    assert all(event.origin == "cqrs" for event in events)


async def test_relay_batches_in_seq_order(engine: Engine, redis_url: str) -> None:
    order_ids = [new_order(engine) for _ in range(5)]
    client = connect(redis_url)

    counts = [await relay_once(engine, client, batch_size=2) for _ in range(4)]
    await client.aclose()

    assert counts == [2, 2, 1, 0]
    assert [event.aggregate_id for event in await stream_events(redis_url)] == order_ids


async def test_relay_keeps_checkpoint_when_redis_down(engine: Engine, redis_url: str) -> None:
    new_order(engine)
    down = connect(f"redis://127.0.0.1:{free_port()}/0")

    with pytest.raises(redis_errors.ConnectionError):
        await relay_once(engine, down, batch_size=100)
    await down.aclose()
    assert read_checkpoint(engine) == 0

    # Once Redis is reachable, the same row is relayed.
    client = connect(redis_url)
    assert await relay_once(engine, client, batch_size=100) == 1
    await client.aclose()
    assert read_checkpoint(engine) == 1


async def test_relay_run_until_stopped(settings: Settings, engine: Engine, redis_url: str) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(outbox_relay.run(settings, stop))
    order_id = new_order(engine)

    for _ in range(200):
        if await stream_events(redis_url):
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, timeout=2)

    assert [event.aggregate_id for event in await stream_events(redis_url)] == [order_id]
    assert read_checkpoint(engine) == 1


async def test_relay_run_survives_redis_down(data_dir: Path, engine: Engine) -> None:
    settings = cqrs_settings(data_dir, f"redis://127.0.0.1:{free_port()}/0")
    new_order(engine)
    stop = asyncio.Event()
    task = asyncio.create_task(outbox_relay.run(settings, stop))

    await asyncio.sleep(0.5)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, timeout=2)
    assert read_checkpoint(engine) == 0


def outbox_seqs(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return list(connection.execute(select(outbox.c.seq).order_by(outbox.c.seq)).scalars())


async def test_relay_prunes_relayed_rows(engine: Engine, redis_url: str) -> None:
    for _ in range(5):
        new_order(engine)
    client = connect(redis_url)

    assert await relay_once(engine, client, batch_size=3) == 3
    assert outbox_seqs(engine) == [4, 5]
    assert await relay_once(engine, client, batch_size=3) == 2
    await client.aclose()

    assert outbox_seqs(engine) == []
    assert read_checkpoint(engine) == 5
    # AUTOINCREMENT keeps new rows above the checkpoint even though the table is empty.
    new_order(engine)
    assert outbox_seqs(engine) == [6]


async def test_relay_keeps_rows_when_redis_down(engine: Engine) -> None:
    new_order(engine)
    down = connect(f"redis://127.0.0.1:{free_port()}/0")

    with pytest.raises(redis_errors.ConnectionError):
        await relay_once(engine, down, batch_size=100)
    await down.aclose()

    assert outbox_seqs(engine) == [1]
