"""CDC relay: publishes the monolith's change log to the `cdc.monolith` stream, at least once.

Each batch is read after the checkpoint in `seq` order, its `monolith`-origin rows are appended in
one MULTI/EXEC pipeline, and only then is the checkpoint stored. A crash between the append and the
checkpoint publishes the batch again on restart, so rows may repeat (consumers skip duplicates by
version) but never go missing. Rows of origin `cqrs` were written by the sync API and are not
published, so no change echoes back to the CQRS side.

SQLite has one writer at a time and a transaction keeps the write lock until it commits, so rows
become visible in `seq` order: a reader can never see seq n+1 while seq n is still uncommitted.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import random

import redis.asyncio as aioredis
import redis.exceptions
from sqlalchemy import Connection, Engine, RowMapping, func, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from services.shared.events import Event
from services.shared.names import CDC_STREAM, ORIGIN_MONOLITH
from services.shared.streams import connect

from ..schema import change_log, open_database, relay_checkpoint
from ..settings import Settings
from ..store import read_connection

log = logging.getLogger(__name__)

CHECKPOINT_NAME = CDC_STREAM
EVENT_SOURCE = "/monolith/cdc"
AGGREGATES = {"orders": "order", "products": "product", "users": "user"}
ACTIONS = {"insert": "created", "update": "updated", "delete": "deleted"}


def event_for_row(row: RowMapping) -> Event:
    """Build the CloudEvents envelope of one change-log row; `time` is when the row changed."""
    event = Event.for_aggregate(
        source=EVENT_SOURCE,
        aggregate=AGGREGATES[row["table_name"]],
        aggregate_id=row["row_id"],
        action=ACTIONS[row["op"]],
        state=json.loads(row["row_json"]),
        origin=ORIGIN_MONOLITH,
    )
    return dataclasses.replace(event, time=row["changed_at"])


def read_checkpoint(engine: Engine) -> int:
    with read_connection(engine) as connection:
        return _checkpoint(connection)


def _checkpoint(connection: Connection) -> int:
    query = select(relay_checkpoint.c.seq).where(relay_checkpoint.c.name == CHECKPOINT_NAME)
    seq = connection.scalar(query)
    return int(seq) if seq is not None else 0


def _read_batch(engine: Engine, batch_size: int) -> list[RowMapping]:
    with read_connection(engine) as connection:
        after = _checkpoint(connection)
        query = (
            select(change_log)
            .where(change_log.c.seq > after)
            .order_by(change_log.c.seq)
            .limit(batch_size)
        )
        return list(connection.execute(query).mappings())


def _store_checkpoint(engine: Engine, seq: int) -> None:
    statement = sqlite_insert(relay_checkpoint).values(name=CHECKPOINT_NAME, seq=seq)
    # MAX keeps the checkpoint from moving back if two relays ever run at once.
    statement = statement.on_conflict_do_update(
        index_elements=[relay_checkpoint.c.name],
        set_={"seq": func.max(statement.excluded.seq, relay_checkpoint.c.seq)},
    )
    with engine.begin() as connection:
        connection.execute(statement)


async def relay_once(engine: Engine, client: "aioredis.Redis", *, batch_size: int) -> int:
    """Publish one batch after the checkpoint, then store the checkpoint.

    Returns the number of change-log rows the checkpoint moved past, published or skipped. A Redis
    error propagates before the checkpoint moves, so the batch is read again on the next call.
    """
    rows = await asyncio.to_thread(_read_batch, engine, batch_size)
    if not rows:
        return 0
    events = [event_for_row(row) for row in rows if row["origin"] == ORIGIN_MONOLITH]
    if events:
        async with client.pipeline(transaction=True) as pipe:
            for event in events:
                pipe.xadd(CDC_STREAM, event.to_fields())  # type: ignore[arg-type]
            await pipe.execute()
    last_seq = int(rows[-1]["seq"])
    await asyncio.to_thread(_store_checkpoint, engine, last_seq)
    log.debug(
        "change-log batch relayed",
        extra={"first_seq": rows[0]["seq"], "last_seq": last_seq, "published": len(events),
               "skipped": len(rows) - len(events), "stream": CDC_STREAM},
    )
    return len(rows)


def _backoff(settings: Settings, failures: int) -> float:
    ceiling = min(
        settings.relay_retry_max_seconds,
        settings.relay_retry_base_seconds * 2 ** max(failures - 1, 0),
    )
    return random.uniform(ceiling / 2, ceiling)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Relay the change log until `stop` is set; retry with backoff while Redis or SQLite fail."""
    engine = await asyncio.to_thread(open_database, settings)
    client = connect(settings.redis_url)
    ids = {"stream": CDC_STREAM, "checkpoint_name": CHECKPOINT_NAME,
           "database": str(settings.resolved_database_path)}
    checkpoint = await asyncio.to_thread(read_checkpoint, engine)
    log.info("CDC relay started", extra={**ids, "checkpoint": checkpoint})
    failures = 0
    try:
        while not stop.is_set():
            try:
                relayed = await relay_once(engine, client, batch_size=settings.relay_batch_size)
            except (redis.exceptions.RedisError, OSError, SQLAlchemyError) as error:
                failures += 1
                delay = _backoff(settings, failures)
                kind = "database" if isinstance(error, SQLAlchemyError) else "Redis"
                log.warning(
                    "CDC relay batch failed; checkpoint kept, retrying",
                    extra={**ids, "dependency": kind, "error": str(error),
                           "consecutive_failures": failures, "retry_in_s": round(delay, 2)},
                )
                await _sleep_unless(stop, delay)
                continue
            if failures:
                log.info("CDC relay recovered", extra={**ids, "failed_attempts": failures})
                failures = 0
            if relayed < settings.relay_batch_size:
                await _sleep_unless(stop, settings.relay_poll_interval_seconds)
    finally:
        await client.aclose()
        engine.dispose()
        log.info("CDC relay stopped", extra=ids)
