"""CDC ingest: monolith events reach the write model by version, and never the outbox."""

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from services.cqrs.commands import create_order, transition_order
from services.cqrs.schema import conflicts, open_write_model, outbox, products
from services.cqrs.settings import Settings
from services.cqrs.workers import cdc_ingest
from services.cqrs.write_model import apply_event, apply_events, load_order, load_product
from services.shared.consistency import Decision
from services.shared.domain import DEMO_PRODUCTS, OrderCreate
from services.shared.events import Event
from services.shared.names import CDC_STREAM, INGEST_GROUP, dead_letter_stream
from services.shared.streams import append, connect
from tests.cqrs_support import (
    FAST_OPTIONS,
    consume_once,
    cqrs_settings,
    order_event,
    product_event,
    seed_products,
)

KEYBOARD = DEMO_PRODUCTS[0]


@pytest.fixture
def settings(data_dir: Path, redis_url: str) -> Settings:
    return cqrs_settings(data_dir, redis_url)


@pytest.fixture
def engine(settings: Settings) -> Engine:
    return open_write_model(settings)


async def ingest(settings: Settings, engine: Engine, events: list[Event]) -> dict[str, Any]:
    """Append `events` to the CDC stream, run one ingest round, return the group's pending info."""
    client = connect(settings.redis_url)
    try:
        for event in events:
            await append(client, CDC_STREAM, event)
        consumer = cdc_ingest.build_consumer(settings, client, engine, options=FAST_OPTIONS)
        await consume_once(consumer)
        pending: dict[str, Any] = await client.xpending(CDC_STREAM, INGEST_GROUP)
    finally:
        await client.aclose()
    return pending


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


def pending_order(engine: Engine) -> dict[str, Any]:
    seed_products(engine)
    request = OrderCreate.model_validate({"items": [{"product_id": "prod-mouse", "quantity": 1}]})
    return create_order(engine, user_id="alice", request=request)


def test_apply_event_decisions(engine: Engine) -> None:
    version_three = product_event(KEYBOARD, version=3, price=9900)
    cases = [
        (product_event(KEYBOARD, version=1), "monolith", Decision.APPLY),
        (version_three, "monolith", Decision.APPLY),
        (product_event(KEYBOARD, version=2, price=9500), "monolith", Decision.STALE),
        (version_three, "monolith", Decision.DUPLICATE),
        (product_event(KEYBOARD, version=3, price=7700), "cqrs", Decision.CONFLICT_KEEP),
        (product_event(KEYBOARD, version=3, price=8800), "monolith", Decision.CONFLICT_APPLY),
    ]
    for event, authority, expected in cases:
        decision = apply_event(engine, event, authority=authority)
        assert decision is expected, (event.aggregate_version, event.data["price"])

    product = load_product(engine, KEYBOARD["id"])
    assert product is not None
    assert product["version"] == 3
    assert product["price"] == 8800
    assert count(engine, conflicts) == 2


def test_apply_events_batch_decisions(engine: Engine) -> None:
    """In one batch each event is decided against the writes of the events before it."""
    mouse = DEMO_PRODUCTS[1]
    apply_event(engine, product_event(mouse, version=4), authority="monolith")
    version_three = product_event(KEYBOARD, version=3, price=9900)
    batch = [
        product_event(KEYBOARD, version=1),
        version_three,
        product_event(mouse, version=3, price=1),
        product_event(KEYBOARD, version=2, price=9500),
        version_three,
        product_event(mouse, version=5, price=2),
        product_event(KEYBOARD, version=3, price=8800),
    ]

    decisions = apply_events(engine, batch, authority="monolith")

    assert decisions == [
        Decision.APPLY, Decision.APPLY, Decision.STALE, Decision.STALE, Decision.DUPLICATE,
        Decision.APPLY, Decision.CONFLICT_APPLY,
    ]
    keyboard = load_product(engine, KEYBOARD["id"])
    assert keyboard is not None
    assert (keyboard["version"], keyboard["price"]) == (3, 8800)
    stored_mouse = load_product(engine, mouse["id"])
    assert stored_mouse is not None
    assert (stored_mouse["version"], stored_mouse["price"]) == (5, 2)
    assert count(engine, conflicts) == 1


async def test_ingest_applies_by_version(settings: Settings, engine: Engine) -> None:
    version_two = product_event(KEYBOARD, version=2, price=9100)
    events = [
        product_event(KEYBOARD, version=1),
        version_two,
        product_event(KEYBOARD, version=1),  # stale
        version_two,  # duplicate delivery
    ]
    pending = await ingest(settings, engine, events)

    assert pending["pending"] == 0
    product = load_product(engine, KEYBOARD["id"])
    assert product is not None
    assert product["version"] == 2
    assert product["price"] == 9100
    with engine.connect() as connection:
        origin = connection.execute(select(products.c.origin)).scalar_one()
    assert origin == "monolith"
    assert count(engine, conflicts) == 0


async def test_ingest_writes_no_outbox(settings: Settings, engine: Engine) -> None:
    order = pending_order(engine)
    assert count(engine, outbox) == 1
    paid_on_monolith = {**order, "status": "paid", "version": 2, "updated_at": order["updated_at"]}

    await ingest(settings, engine, [order_event(paid_on_monolith, action="updated",
                                                origin="monolith")])

    stored = load_order(engine, order["id"])
    assert stored is not None
    assert stored["status"] == "paid"
    assert stored["version"] == 2
    assert count(engine, outbox) == 1


async def test_ingest_records_conflict(settings: Settings, engine: Engine) -> None:
    order = pending_order(engine)
    paid = transition_order(engine, order_id=order["id"], user_id="alice", action="pay")
    cancelled_on_monolith = {**paid, "status": "cancelled"}

    await ingest(settings, engine, [order_event(cancelled_on_monolith, action="updated",
                                                origin="monolith")])

    # In the canary phase the monolith is the authority, so its state replaces the local one.
    stored = load_order(engine, order["id"])
    assert stored is not None
    assert stored["status"] == "cancelled"
    with engine.connect() as connection:
        rows = connection.execute(select(conflicts)).all()
    assert len(rows) == 1
    assert rows[0].aggregate == "order"
    assert rows[0].aggregate_id == order["id"]
    assert rows[0].version == 2
    assert rows[0].resolution == "conflict_apply"
    assert rows[0].incoming_origin == "monolith"
    assert json.loads(rows[0].local_json)["status"] == "paid"
    assert json.loads(rows[0].incoming_json)["status"] == "cancelled"
    assert count(engine, outbox) == 2


async def test_ingest_conflict_after_cutover(data_dir: Path, redis_url: str) -> None:
    settings = cqrs_settings(data_dir, redis_url, phase="cutover")
    engine = open_write_model(settings)
    order = pending_order(engine)
    paid = transition_order(engine, order_id=order["id"], user_id="alice", action="pay")

    await ingest(settings, engine, [order_event({**paid, "status": "cancelled"},
                                                action="updated", origin="monolith")])

    stored = load_order(engine, order["id"])
    assert stored is not None
    assert stored["status"] == "paid"
    with engine.connect() as connection:
        assert connection.execute(select(conflicts.c.resolution)).scalar_one() == "conflict_keep"


async def test_ingest_skips_other_origins(settings: Settings, engine: Engine) -> None:
    echoed = product_event(KEYBOARD, version=1, origin="cqrs")

    pending = await ingest(settings, engine, [echoed])

    assert pending["pending"] == 0
    assert load_product(engine, KEYBOARD["id"]) is None


async def test_ingest_deletes_by_version(settings: Settings, engine: Engine) -> None:
    mouse, cable = DEMO_PRODUCTS[1], DEMO_PRODUCTS[3]
    events = [
        product_event(mouse, version=2),
        product_event(cable, version=3),
        product_event(mouse, version=2, action="deleted"),
        product_event(cable, version=2, action="deleted"),  # older than the stored version
    ]
    await ingest(settings, engine, events)

    assert load_product(engine, mouse["id"]) is None
    stored = load_product(engine, cable["id"])
    assert stored is not None
    assert stored["version"] == 3


async def test_ingest_dead_letters_invalid_state(settings: Settings, engine: Engine) -> None:
    broken = Event.for_aggregate(
        source="/monolith/cdc", aggregate="product", aggregate_id="prod-x", action="created",
        state={"id": "prod-x", "version": 1}, origin="monolith",
    )
    pending = await ingest(settings, engine, [broken])

    assert pending["pending"] == 0
    client = connect(settings.redis_url)
    dead = await client.xrange(dead_letter_stream(CDC_STREAM))
    await client.aclose()
    assert len(dead) == 1
    assert dead[0][1]["id"] == broken.id
    assert "prod-x" in dead[0][1]["dlq_error"]
    assert count(engine, products) == 0


async def test_ingest_run_until_stopped(settings: Settings, engine: Engine) -> None:
    client = connect(settings.redis_url)
    await append(client, CDC_STREAM, product_event(KEYBOARD, version=1))
    await client.aclose()
    stop = asyncio.Event()
    task = asyncio.create_task(cdc_ingest.run(settings, stop))

    for _ in range(200):
        if load_product(engine, KEYBOARD["id"]) is not None:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, timeout=3)

    assert load_product(engine, KEYBOARD["id"]) is not None


async def test_ingest_waits_out_broken_database(settings: Settings, engine: Engine) -> None:
    # A write model that cannot be written is not the event's fault: no try is counted.
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE products RENAME TO products_away")
    client = connect(settings.redis_url)
    await append(client, CDC_STREAM, product_event(KEYBOARD, version=1))
    consumer = cdc_ingest.build_consumer(settings, client, engine, options=FAST_OPTIONS)
    for _round in range(FAST_OPTIONS.max_tries + 2):
        assert await consume_once(consumer) == 0
    assert await client.xlen(dead_letter_stream(CDC_STREAM)) == 0
    assert (await client.xpending(CDC_STREAM, INGEST_GROUP))["pending"] == 1

    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE products_away RENAME TO products")
    assert await consume_once(consumer) == 1
    await client.aclose()

    assert load_product(engine, KEYBOARD["id"]) is not None
