"""Outbox relay: appends the write model's outbox rows to their streams, in `seq` order.

Each round reads the rows after the stored checkpoint, appends them in one MULTI/EXEC and only then
stores the last `seq` as the new checkpoint. A crash between the two appends the rows again on the
next round, so delivery is at least once and receivers skip the duplicates by version. Commands
insert outbox rows under SQLite's single write lock, so rows commit in `seq` order and a row can
never appear behind the checkpoint.
"""

import asyncio
import json
import logging

import redis.asyncio as redis
from redis import exceptions as redis_errors
from sqlalchemy import Engine, func, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError

from services.shared.streams import connect

from ..schema import open_write_model, outbox, relay_checkpoint
from ..settings import Settings
from ..write_model import reading
from .common import backoff_seconds, sleep_unless_stopped

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "outbox-relay"


def read_checkpoint(engine: Engine, name: str = CHECKPOINT_NAME) -> int:
    """Return the last relayed outbox `seq`, 0 before the first round."""
    with reading(engine) as connection:
        seq = connection.execute(
            select(relay_checkpoint.c.seq).where(relay_checkpoint.c.name == name)
        ).scalar()
    return int(seq or 0)


def store_checkpoint(engine: Engine, seq: int, name: str = CHECKPOINT_NAME) -> None:
    """Store `seq` as the checkpoint; it never moves backwards, even with two relays running."""
    statement = sqlite_insert(relay_checkpoint).values(name=name, seq=seq)
    statement = statement.on_conflict_do_update(
        index_elements=[relay_checkpoint.c.name],
        set_={"seq": func.max(relay_checkpoint.c.seq, statement.excluded.seq)},
    )
    with engine.begin() as connection:
        connection.execute(statement)


OutboxRow = tuple[int, str, dict[str, str]]  # seq, stream, entry fields


def read_outbox(engine: Engine, after_seq: int, limit: int) -> list[OutboxRow]:
    """Return up to `limit` outbox rows after `after_seq` as (seq, stream, fields), in order."""
    query = (
        select(outbox.c.seq, outbox.c.stream, outbox.c.fields)
        .where(outbox.c.seq > after_seq)
        .order_by(outbox.c.seq)
        .limit(limit)
    )
    with reading(engine) as connection:
        return [(row.seq, row.stream, json.loads(row.fields)) for row in connection.execute(query)]


async def relay_once(
    engine: Engine, client: "redis.Redis", *, batch_size: int, name: str = CHECKPOINT_NAME
) -> int:
    """Append the next batch of outbox rows to their streams and return how many were appended.

    Raises the Redis or SQLite error when the append or the checkpoint fails. The checkpoint then
    stays where it was, so the next round appends the same rows again.
    """
    checkpoint = await asyncio.to_thread(read_checkpoint, engine, name)
    rows = await asyncio.to_thread(read_outbox, engine, checkpoint, batch_size)
    if not rows:
        return 0
    async with client.pipeline(transaction=True) as pipe:
        for _seq, stream, fields in rows:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]  # dict is invariant
        await pipe.execute()
    last_seq = rows[-1][0]
    await asyncio.to_thread(store_checkpoint, engine, last_seq, name)
    log.debug(
        "outbox rows relayed",
        extra={"count": len(rows), "first_seq": rows[0][0], "last_seq": last_seq},
    )
    return len(rows)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Relay outbox rows until `stop` is set, retrying with backoff while Redis or SQLite fail."""
    engine = open_write_model(settings)
    client = connect(settings.redis_url)
    log.info(
        "outbox relay started",
        extra={"database_path": str(settings.database_file),
               "batch_size": settings.relay_batch_size},
    )
    failures = 0
    try:
        while not stop.is_set():
            try:
                count = await relay_once(engine, client, batch_size=settings.relay_batch_size)
            except (
                redis_errors.ConnectionError, redis_errors.TimeoutError, OSError,
                OperationalError,
            ) as error:
                failures += 1
                delay = backoff_seconds(failures)
                log.warning(
                    "outbox relay round failed; retrying",
                    extra={"error": repr(error), "failures": failures,
                           "retry_in_s": round(delay, 2)},
                )
                await sleep_unless_stopped(stop, delay)
                continue
            failures = 0
            if count < settings.relay_batch_size:
                await sleep_unless_stopped(stop, settings.relay_poll_interval_seconds)
    finally:
        await client.aclose()
        engine.dispose()
        log.info("outbox relay stopped")
