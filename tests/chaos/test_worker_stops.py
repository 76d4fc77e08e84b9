"""Workers killed with SIGKILL lose nothing; workers stopped with SIGTERM finish what they hold.

Each test runs the worker as a real `ztcqrs worker` process against a real Redis and SQLite file.
"""

import asyncio
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from sqlalchemy import text

from services.cqrs.schema import open_write_model
from services.cqrs.workers import cdc_ingest
from services.monolith.schema import open_database
from services.monolith.settings import Settings as MonolithSettings
from services.monolith.workers.cdc_relay import read_checkpoint
from services.shared.events import Event
from services.shared.names import CDC_STREAM, INGEST_GROUP, dead_letter_stream
from services.shared.streams import ConsumerOptions, StreamConsumer, append, connect
from tests.chaos.support import (
    count_rows,
    product_events,
    start_worker,
    wait_until,
    worker_env,
)
from tests.cqrs_support import consume_once, cqrs_settings

EVENTS = 4000
# A worker stopped with SIGTERM must exit before the local runner's 10 s stop timeout kills it.
# It takes the 1 s blocking read at most, plus the entry in hand, far below the 5 s grace.
STOP_BOUND_SECONDS = 8.0


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


async def append_all(client: aioredis.Redis, events: list[Event]) -> dict[str, str]:
    """Append `events` to the CDC stream; return entry id to product id."""
    entries: dict[str, str] = {}
    async with client.pipeline(transaction=False) as pipe:
        for event in events:
            pipe.xadd(CDC_STREAM, event.to_fields())  # type: ignore[arg-type]
        ids = await pipe.execute()
    for entry_id, event in zip(ids, events, strict=True):
        entries[str(entry_id)] = event.aggregate_id
    return entries


def products_in(database: Path) -> int:
    return count_rows(database, "SELECT COUNT(*) FROM products")


def pending_for(redis_url: str, consumer: str) -> int:
    """Return the number of ingest-group entries delivered to `consumer` and not acknowledged."""
    with sync_redis.Redis.from_url(redis_url) as client:
        consumers = client.xinfo_consumers(CDC_STREAM, INGEST_GROUP)
    return sum(int(entry["pending"]) for entry in consumers if entry["name"] == consumer.encode())


def applies_above_one(database: Path) -> int:
    return count_rows(database, "SELECT COUNT(*) FROM applied_versions WHERE applies > 1")


async def finish_with_rescuer(
    data_dir: Path, redis_url: str, client: aioredis.Redis, claim_idle_ms: int
) -> int:
    """Run another ingest consumer until the group has nothing pending; return its rounds."""
    settings = cqrs_settings(data_dir, redis_url, consumer_name="rescuer")
    engine = open_write_model(settings)
    options = ConsumerOptions(max_tries=3, claim_idle_ms=claim_idle_ms, block_ms=20,
                              retry_base_seconds=0.02, retry_max_seconds=0.1)
    consumer = cdc_ingest.build_consumer(settings, client, engine, options=options)
    rounds = 0
    deadline = time.monotonic() + 60
    while True:
        rounds += 1
        await consume_once(consumer)
        info = await client.xinfo_groups(CDC_STREAM)
        pending = next(group["pending"] for group in info if group["name"] == INGEST_GROUP)
        if pending == 0 and products_in(settings.database_file) == EVENTS:
            break
        assert time.monotonic() < deadline, "the rescuer did not finish within 60 s"
    engine.dispose()
    return rounds


async def test_killed_consumer_loses_nothing(
    data_dir: Path, redis_url: str, client: aioredis.Redis, tmp_path: Path
) -> None:
    database = data_dir / "cqrs.db"
    await append_all(client, product_events(EVENTS))
    env = worker_env(data_dir, redis_url, CQRS_CONSUMER_NAME="victim")
    worker = start_worker("cdc-ingest", env, tmp_path / "victim.log")
    # Between two batches the worker has no unacknowledged entry, so a kill there would test
    # nothing. Taking SQLite's write lock stops the worker after it reads its next batch and
    # before it applies it, so the kill lands while entries are delivered and unacknowledged.
    blocker = sqlite3.connect(database, timeout=30, isolation_level=None)
    try:
        wait_until(lambda: products_in(database) >= 200, timeout=60, condition="ingest to start")
        blocker.execute("BEGIN IMMEDIATE")
        wait_until(lambda: pending_for(redis_url, "victim") > 0, timeout=30,
                   condition="the victim to read a batch it cannot apply")
    finally:
        worker.kill()
        worker.wait()
        blocker.close()

    summary = await client.xpending(CDC_STREAM, INGEST_GROUP)
    applied_before = products_in(database)
    assert applied_before < EVENTS
    assert summary["pending"] > 0
    assert [consumer["name"] for consumer in summary["consumers"]] == ["victim"]

    await finish_with_rescuer(data_dir, redis_url, client, claim_idle_ms=300)

    assert products_in(database) == EVENTS
    assert count_rows(database, "SELECT COUNT(*) FROM applied_versions") == EVENTS
    assert applies_above_one(database) == 0
    assert await client.xlen(dead_letter_stream(CDC_STREAM)) == 0


async def test_sigterm_consumer_acks_in_flight(
    data_dir: Path, redis_url: str, client: aioredis.Redis, tmp_path: Path
) -> None:
    database = data_dir / "cqrs.db"
    entries = await append_all(client, product_events(EVENTS))
    claim_idle_ms = 60_000
    env = worker_env(data_dir, redis_url, CQRS_CONSUMER_NAME="graceful",
                     CQRS_CLAIM_IDLE_MS=str(claim_idle_ms))
    log_path = tmp_path / "graceful.log"
    worker = start_worker("cdc-ingest", env, log_path)
    try:
        wait_until(lambda: products_in(database) >= 200, timeout=60, condition="ingest to start")
        stopping = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=STOP_BOUND_SECONDS)
        stopped_in = time.monotonic() - stopping
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    assert code == 0
    assert stopped_in < STOP_BOUND_SECONDS
    log = log_path.read_text()
    assert "consumer stopped" in log
    assert "Traceback" not in log

    # Nothing applied is left pending, and what is pending was released for an immediate claim.
    # Whether anything is pending depends on where in its batch the worker was when stopped.
    pending = await client.xpending_range(CDC_STREAM, INGEST_GROUP, min="-", max="+",
                                          count=EVENTS)
    with open_write_model(cqrs_settings(data_dir, redis_url)).connect() as connection:
        applied = set(connection.execute(text("SELECT id FROM products")).scalars())
    assert applied
    assert len(applied) < EVENTS
    assert not {entries[row["message_id"]] for row in pending} & applied
    assert all(row["time_since_delivered"] >= claim_idle_ms for row in pending)
    assert bool(pending) == ("released unhandled entries at shutdown" in log)

    rounds = await finish_with_rescuer(data_dir, redis_url, client, claim_idle_ms=claim_idle_ms)

    assert rounds < 60  # the released entries were claimed without waiting for claim_idle_ms
    assert products_in(database) == EVENTS
    assert applies_above_one(database) == 0


async def test_stop_releases_rest_of_batch(client: aioredis.Redis) -> None:
    stop = asyncio.Event()
    handled: list[str] = []

    async def stop_after_third(stream: str, entry_id: str, event: Event) -> None:
        handled.append(entry_id)
        if len(handled) == 3:
            stop.set()

    events = product_events(10)
    entries = await append_all(client, events)
    options = ConsumerOptions(block_ms=20, claim_idle_ms=60_000)
    consumer = StreamConsumer(client, streams=[CDC_STREAM], group=INGEST_GROUP,
                              consumer="stopping", handler=stop_after_third, options=options)

    await asyncio.wait_for(consumer.run(stop), timeout=5)

    # The entry in hand when the stop came was finished and acknowledged; the rest were released.
    pending = await client.xpending_range(CDC_STREAM, INGEST_GROUP, min="-", max="+", count=20)
    assert handled == list(entries)[:3]
    assert [row["message_id"] for row in pending] == list(entries)[3:]
    assert all(row["time_since_delivered"] >= 60_000 for row in pending)
    assert all(row["times_delivered"] == 1 for row in pending)
    claimed = await client.xautoclaim(CDC_STREAM, INGEST_GROUP, "other", min_idle_time=60_000)
    assert [entry_id for entry_id, _fields in claimed[1]] == list(entries)[3:]


async def test_grace_bounds_slow_handler(client: aioredis.Redis) -> None:
    release = asyncio.Event()

    async def stuck(stream: str, entry_id: str, event: Event) -> None:
        await release.wait()

    await append(client, CDC_STREAM, product_events(1)[0])
    options = ConsumerOptions(block_ms=20, shutdown_grace_seconds=0.3)
    consumer = StreamConsumer(client, streams=[CDC_STREAM], group=INGEST_GROUP,
                              consumer="slow", handler=stuck, options=options)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.sleep(0.2)

    stopping = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, timeout=2)

    assert 0.25 < time.monotonic() - stopping < 1.0
    assert (await client.xpending(CDC_STREAM, INGEST_GROUP))["pending"] == 1


def test_sigterm_relay_stores_checkpoint(data_dir: Path, redis_url: str, tmp_path: Path) -> None:
    settings = MonolithSettings(data_dir=data_dir, redis_url=redis_url)
    engine = open_database(settings)
    with engine.begin() as connection:
        connection.execute(text(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) "
            "INSERT INTO products (id, name, price, updated_at) "
            "SELECT 'prod-' || i, 'Product ' || i, i, '2030-01-01T00:00:00.000000Z' FROM n"
        ))
    env = worker_env(data_dir, redis_url, MONOLITH_RELAY_BATCH_SIZE="50")
    log_path = tmp_path / "relay.log"
    relay = start_worker("cdc-relay", env, log_path)
    try:
        wait_until(lambda: read_checkpoint(engine) >= 1000, timeout=60, condition="relay to start")
        relay.send_signal(signal.SIGTERM)
        code = relay.wait(timeout=STOP_BOUND_SECONDS)
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()

    assert code == 0
    assert "CDC relay stopped" in log_path.read_text()
    checkpoint = read_checkpoint(engine)
    assert checkpoint < 20000
    # The round in progress finished: every row up to the checkpoint is on the stream, and no
    # row after it.
    stream_length = asyncio.run(_stream_length(redis_url))
    assert stream_length == checkpoint
    engine.dispose()


async def _stream_length(redis_url: str) -> int:
    client = connect(redis_url)
    try:
        return int(await client.xlen(CDC_STREAM))
    finally:
        await client.aclose()

