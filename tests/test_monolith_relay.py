"""CDC relay from the monolith's change log to `cdc.monolith`, against real SQLite and Redis."""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from sqlalchemy import Engine, text

from services.monolith.schema import open_database
from services.monolith.settings import Settings
from services.monolith.workers import cdc_relay
from services.monolith.workers.cdc_relay import read_checkpoint, relay_once
from services.shared.domain import DEMO_PRODUCTS, DEMO_USERS
from services.shared.events import Event
from services.shared.names import CDC_STREAM
from services.shared.streams import connect
from tests.conftest import free_port

SEEDED_ROWS = len(DEMO_USERS) + len(DEMO_PRODUCTS)


def relay_settings(data_dir: Path, redis_url: str) -> Settings:
    return Settings(
        data_dir=data_dir, redis_url=redis_url, relay_retry_base_seconds=0.02,
        relay_retry_max_seconds=0.1,
    )


@pytest.fixture
def settings(data_dir: Path, redis_url: str) -> Settings:
    return relay_settings(data_dir, redis_url)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = open_database(settings, seed=True)
    yield engine
    engine.dispose()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


def execute(engine: Engine, statement: str) -> None:
    with engine.begin() as connection:
        connection.execute(text(statement))


def change_log(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        query = text("SELECT * FROM change_log ORDER BY seq")
        return [dict(row) for row in connection.execute(query).mappings()]


async def published(client: aioredis.Redis) -> list[Event]:
    entries = await client.xrange(CDC_STREAM)
    return [Event.from_fields(fields) for _entry_id, fields in entries]


async def wait_for_length(client: aioredis.Redis, length: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while await client.xlen(CDC_STREAM) < length:
        assert time.monotonic() < deadline, f"{CDC_STREAM} did not reach {length} entries"
        await asyncio.sleep(0.02)


def sync_write(engine: Engine, statement: str) -> None:
    """Run `statement` as the sync API does, so the change log tags it with origin `cqrs`."""
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO sync_context (origin) VALUES ('cqrs')"))
        connection.execute(text(statement))
        connection.execute(text("DELETE FROM sync_context"))


def change_log_seqs(engine: Engine, row_id: str) -> list[int]:
    return [row["seq"] for row in change_log(engine) if row["row_id"] == row_id]


async def test_relay_publishes_in_order(engine: Engine, client: aioredis.Redis) -> None:
    execute(engine, "UPDATE products SET price = 1000 WHERE id = 'prod-cable'")
    execute(engine, "DELETE FROM users WHERE id = 'bob'")
    rows = change_log(engine)

    relayed = await relay_once(engine, client, batch_size=500)

    events = await published(client)
    assert relayed == len(rows) == SEEDED_ROWS + 2
    assert [event.subject for event in events] == [
        f"{row['table_name'].removesuffix('s')}/{row['row_id']}" for row in rows
    ]
    for event, row in zip(events, rows, strict=True):
        assert event.data == json.loads(row["row_json"])
        assert event.aggregate_version == row["version"]
        assert event.origin == "monolith"
        assert event.source == "/monolith/cdc"
        assert event.time == row["changed_at"]
    assert events[0].type == "ztcqrs.user.created"
    assert events[-2].type == "ztcqrs.product.updated"
    assert events[-1].type == "ztcqrs.user.deleted"
    assert events[-1].deleted
    assert len({event.id for event in events}) == len(events)
    assert read_checkpoint(engine) == rows[-1]["seq"]


async def test_relay_second_run_publishes_nothing(engine: Engine, client: aioredis.Redis) -> None:
    await relay_once(engine, client, batch_size=500)

    again = await relay_once(engine, client, batch_size=500)

    assert again == 0
    assert await client.xlen(CDC_STREAM) == SEEDED_ROWS
    assert read_checkpoint(engine) == SEEDED_ROWS


async def test_relay_batch_size(engine: Engine, client: aioredis.Redis) -> None:
    first = await relay_once(engine, client, batch_size=3)

    assert first == 3
    assert read_checkpoint(engine) == 3
    assert await client.xlen(CDC_STREAM) == 3

    rest = await relay_once(engine, client, batch_size=500)

    assert rest == SEEDED_ROWS - 3
    events = await published(client)
    assert [event.data["id"] for event in events] == [row["row_id"] for row in change_log(engine)]


async def test_relay_skips_cqrs_rows(engine: Engine, client: aioredis.Redis) -> None:
    sync_write(engine, "UPDATE products SET price = 5 WHERE id = 'prod-mouse'")
    execute(engine, "UPDATE products SET price = 6 WHERE id = 'prod-cable'")

    relayed = await relay_once(engine, client, batch_size=500)

    events = await published(client)
    assert relayed == SEEDED_ROWS + 2
    assert len(events) == SEEDED_ROWS + 1
    assert events[-1].subject == "product/prod-cable"
    assert read_checkpoint(engine) == SEEDED_ROWS + 2


async def test_relay_only_cqrs_rows_advances(engine: Engine, client: aioredis.Redis) -> None:
    await relay_once(engine, client, batch_size=500)
    sync_write(engine, "UPDATE products SET price = 5 WHERE id = 'prod-mouse'")

    relayed = await relay_once(engine, client, batch_size=500)

    assert relayed == 1
    assert read_checkpoint(engine) == SEEDED_ROWS + 1
    assert await client.xlen(CDC_STREAM) == SEEDED_ROWS


async def test_skipped_rows_defer_checkpoint(engine: Engine, client: aioredis.Redis) -> None:
    deferred = cdc_relay.DeferredCheckpoint(interval_seconds=3600)
    await relay_once(engine, client, batch_size=500, deferred=deferred)
    sync_write(engine, "UPDATE products SET price = 5 WHERE id = 'prod-mouse'")

    skipped = await relay_once(engine, client, batch_size=500, deferred=deferred)
    again = await relay_once(engine, client, batch_size=500, deferred=deferred)

    assert skipped == 1
    assert again == 0
    assert read_checkpoint(engine) == SEEDED_ROWS
    assert deferred.position == SEEDED_ROWS + 1
    assert cdc_relay.oldest_unrelayed(engine) is not None
    assert cdc_relay.oldest_unrelayed(engine, deferred.position) is None

    execute(engine, "UPDATE products SET price = 6 WHERE id = 'prod-cable'")
    relayed = await relay_once(engine, client, batch_size=500, deferred=deferred)

    assert relayed == 1
    assert read_checkpoint(engine) == SEEDED_ROWS + 2
    assert deferred.position == 0
    assert await client.xlen(CDC_STREAM) == SEEDED_ROWS + 1
    # The prune covered the skipped row too, so the seeded row it superseded is gone.
    assert change_log_seqs(engine, "prod-mouse") == [SEEDED_ROWS + 1]


async def test_deferred_checkpoint_stored_when_due(engine: Engine, client: aioredis.Redis) -> None:
    deferred = cdc_relay.DeferredCheckpoint(interval_seconds=0.05)
    await relay_once(engine, client, batch_size=500, deferred=deferred)
    sync_write(engine, "UPDATE products SET price = 5 WHERE id = 'prod-mouse'")
    await relay_once(engine, client, batch_size=500, deferred=deferred)
    assert read_checkpoint(engine) == SEEDED_ROWS

    await asyncio.sleep(0.06)
    relayed = await relay_once(engine, client, batch_size=500, deferred=deferred)

    assert relayed == 0
    assert read_checkpoint(engine) == SEEDED_ROWS + 1
    assert deferred.position == 0
    assert await client.xlen(CDC_STREAM) == SEEDED_ROWS


async def test_run_stores_deferred_checkpoint_at_stop(
    settings: Settings, engine: Engine, client: aioredis.Redis
) -> None:
    stop = asyncio.Event()
    worker = asyncio.create_task(cdc_relay.run(settings, stop))
    await wait_for_length(client, SEEDED_ROWS)
    sync_write(engine, "UPDATE products SET price = 5 WHERE id = 'prod-mouse'")
    # The relay polls every 2 ms, so it has skipped the row long before the stop, and the one-second
    # deferral has not run out yet.
    await asyncio.sleep(0.3)

    stop.set()
    await asyncio.wait_for(worker, timeout=5)

    assert read_checkpoint(engine) == SEEDED_ROWS + 1
    assert await client.xlen(CDC_STREAM) == SEEDED_ROWS


async def test_relay_redis_down_keeps_checkpoint(engine: Engine, client: aioredis.Redis) -> None:
    unreachable = connect(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await relay_once(engine, unreachable, batch_size=500)
    finally:
        await unreachable.aclose()
    assert read_checkpoint(engine) == 0
    execute(engine, "UPDATE products SET price = 7 WHERE id = 'prod-stand'")

    relayed = await relay_once(engine, client, batch_size=500)

    events = await published(client)
    assert relayed == SEEDED_ROWS + 1
    assert len(events) == SEEDED_ROWS + 1
    assert events[-1].data["price"] == 7


async def test_run_retries_until_redis_back(
    data_dir: Path, engine: Engine, client: aioredis.Redis, redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=cdc_relay.__name__)
    down = relay_settings(data_dir, f"redis://127.0.0.1:{free_port()}/0")
    stop = asyncio.Event()
    worker = asyncio.create_task(cdc_relay.run(down, stop))
    await asyncio.sleep(0.3)
    execute(engine, "UPDATE products SET price = 8 WHERE id = 'prod-mouse'")
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(worker, timeout=5)
    assert read_checkpoint(engine) == 0
    assert await client.xlen(CDC_STREAM) == 0
    retries = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(retries) >= 2
    assert {getattr(record, "dependency", None) for record in retries} == {"Redis"}
    assert all(getattr(record, "retry_in_s", 0) > 0 for record in retries)

    stop = asyncio.Event()
    worker = asyncio.create_task(cdc_relay.run(relay_settings(data_dir, redis_url), stop))
    await wait_for_length(client, SEEDED_ROWS + 1)
    execute(engine, "UPDATE products SET price = 9 WHERE id = 'prod-mouse'")
    await wait_for_length(client, SEEDED_ROWS + 2)
    stop.set()
    await asyncio.wait_for(worker, timeout=5)

    events = await published(client)
    assert len(events) == SEEDED_ROWS + 2
    assert [event.data.get("price") for event in events[-2:]] == [8, 9]
    assert read_checkpoint(engine) == SEEDED_ROWS + 2


async def test_run_stops_promptly(settings: Settings, engine: Engine) -> None:
    stop = asyncio.Event()
    worker = asyncio.create_task(cdc_relay.run(settings, stop))
    await asyncio.sleep(0.2)

    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(worker, timeout=5)

    assert time.monotonic() - started < 1.0
    assert read_checkpoint(engine) == SEEDED_ROWS


def versions_logged(engine: Engine) -> list[tuple[str, str, int]]:
    return sorted(
        (row["table_name"], row["row_id"], row["version"]) for row in change_log(engine)
    )


async def test_relay_prunes_superseded_rows(engine: Engine, client: aioredis.Redis) -> None:
    for _update in range(3):
        execute(engine, "UPDATE products SET price = price + 100 WHERE id = 'prod-mouse'")
    execute(engine, "DELETE FROM users WHERE id = 'bob'")

    await relay_once(engine, client, batch_size=500)

    kept = versions_logged(engine)
    assert ("products", "prod-mouse", 4) in kept
    assert [row for row in kept if row[1] == "prod-mouse"] == [("products", "prod-mouse", 4)]
    assert [row for row in kept if row[1] == "bob"] == [("users", "bob", 1)]
    assert next(row for row in change_log(engine) if row["row_id"] == "bob")["op"] == "delete"
    assert len(kept) == SEEDED_ROWS
    assert await client.xlen(CDC_STREAM) == SEEDED_ROWS + 4


async def test_relay_prunes_relayed_rows_only(engine: Engine, client: aioredis.Redis) -> None:
    await relay_once(engine, client, batch_size=500)
    for _update in range(3):
        execute(engine, "UPDATE products SET price = price + 100 WHERE id = 'prod-mouse'")

    await relay_once(engine, client, batch_size=2)

    # The first two updates are relayed and superseded; the third is not relayed yet, so it stays.
    mouse = [row for row in change_log(engine) if row["row_id"] == "prod-mouse"]
    assert [(row["version"], row["seq"]) for row in mouse] == [(4, SEEDED_ROWS + 3)]
    assert read_checkpoint(engine) == SEEDED_ROWS + 2

    await relay_once(engine, client, batch_size=500)

    events = await published(client)
    assert [event.aggregate_version for event in events[-3:]] == [2, 3, 4]


async def test_pruned_log_keeps_versions_rising(engine: Engine, client: aioredis.Redis) -> None:
    execute(engine, "UPDATE products SET price = 1 WHERE id = 'prod-stand'")
    execute(engine, "DELETE FROM products WHERE id = 'prod-stand'")
    await relay_once(engine, client, batch_size=500)

    # The triggers read the last logged version of an id, which pruning must keep.
    execute(
        engine,
        "INSERT INTO products (id, name, price, updated_at) "
        "VALUES ('prod-stand', 'Stand', 4000, '2030-01-01T00:00:00.000000Z')",
    )
    execute(
        engine,
        "INSERT OR REPLACE INTO products (id, name, price, version, updated_at) "
        "VALUES ('prod-mouse', 'Mouse', 2000, 1, '2030-01-01T00:00:00.000000Z')",
    )
    await relay_once(engine, client, batch_size=500)

    events = await published(client)
    assert [(event.subject, event.aggregate_version) for event in events[-2:]] == [
        ("product/prod-stand", 3),
        ("product/prod-mouse", 2),
    ]


async def test_run_trims_acknowledged_entries(
    data_dir: Path, engine: Engine, client: aioredis.Redis, redis_url: str
) -> None:
    settings = relay_settings(data_dir, redis_url).model_copy(
        update={"relay_trim_interval_seconds": 0.05, "relay_stream_retention_seconds": 0}
    )
    await client.xgroup_create(CDC_STREAM, "cqrs-ingest", id="0", mkstream=True)
    stop = asyncio.Event()
    worker = asyncio.create_task(cdc_relay.run(settings, stop))
    await wait_for_length(client, SEEDED_ROWS)
    await asyncio.sleep(0.2)
    assert await client.xlen(CDC_STREAM) == SEEDED_ROWS  # no group has acknowledged anything

    # The relay created the projector's group, which has not read anything yet.
    groups = {info["name"] for info in await client.xinfo_groups(CDC_STREAM)}
    assert groups == {"cqrs-ingest", "cqrs-projector"}
    for group in groups:
        entries = await client.xreadgroup(group, "test", {CDC_STREAM: ">"})
        ids = [entry_id for entry_id, _fields in entries[0][1]]
        await client.xack(CDC_STREAM, group, *ids[:4])

    deadline = time.monotonic() + 5
    while await client.xlen(CDC_STREAM) > SEEDED_ROWS - 4:
        assert time.monotonic() < deadline, "the stream was not trimmed"
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(worker, timeout=5)

    remaining = await client.xrange(CDC_STREAM)
    assert len(remaining) == SEEDED_ROWS - 4
    assert Event.from_fields(remaining[0][1]).id == "monolith-change-5"
