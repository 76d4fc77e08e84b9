"""Outbox relay: appends the write model's outbox rows to their streams, in `seq` order.

Delivery is at least once, as `services.shared.relay` describes. Every round reports the relay's
lag (see `services.shared.migration_health`) at most once a second. Commands
insert outbox rows under SQLite's single write lock, so rows commit in `seq` order and a row can
never appear behind the checkpoint. Relayed rows are deleted in the checkpoint's transaction.
"""

import asyncio
import json
import logging
import time

import redis.asyncio as redis
from sqlalchemy import Connection, Engine, bindparam, delete, select

from services.shared import relay
from services.shared.migration_health import RelayLagReporter, observe_publish_lag
from services.shared.names import CQRS_STREAM, OUTBOX_RELAY_NAME, STREAM_GROUPS
from services.shared.streams import connect, trim_acknowledged

from ..schema import open_write_model, outbox, relay_checkpoint
from ..settings import Settings
from ..write_model import reading

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "outbox-relay"


def read_checkpoint(engine: Engine, name: str = CHECKPOINT_NAME) -> int:
    """Return the last relayed outbox `seq`, 0 before the first round."""
    with reading(engine) as connection:
        return relay.read_checkpoint(connection, relay_checkpoint, name)


OutboxRow = tuple[int, str, dict[str, str], str]  # seq, stream, entry fields, created_at


_OUTBOX_AFTER = (
    select(outbox.c.seq, outbox.c.stream, outbox.c.fields, outbox.c.created_at)
    .where(outbox.c.seq > bindparam("after_seq"))
    .order_by(outbox.c.seq)
    .limit(bindparam("limit"))
)


def read_outbox(engine: Engine, after_seq: int, limit: int) -> list[OutboxRow]:
    """Return up to `limit` outbox rows after `after_seq` as (seq, stream, fields, created_at),
    in order."""
    with reading(engine) as connection:
        return _outbox_rows(connection, after_seq, limit)


def _outbox_rows(connection: Connection, after_seq: int, limit: int) -> list[OutboxRow]:
    rows = connection.execute(_OUTBOX_AFTER, {"after_seq": after_seq, "limit": limit})
    return [(row.seq, row.stream, json.loads(row.fields), row.created_at) for row in rows]


def _read_batch(engine: Engine, name: str, limit: int) -> tuple[int, list[OutboxRow]]:
    # One worker-thread call and one read transaction per round, because a relay runs a round
    # after every commit to the database.
    with reading(engine) as connection:
        checkpoint = relay.read_checkpoint(connection, relay_checkpoint, name)
        return checkpoint, _outbox_rows(connection, checkpoint, limit)


def oldest_unrelayed(engine: Engine, name: str = CHECKPOINT_NAME) -> str | None:
    """Return the `created_at` of the oldest outbox row after the checkpoint, or None."""
    checkpoint = read_checkpoint(engine, name)
    query = (
        select(outbox.c.created_at).where(outbox.c.seq > checkpoint).order_by(outbox.c.seq).limit(1)
    )
    with reading(engine) as connection:
        created_at = connection.scalar(query)
    return None if created_at is None else str(created_at)


def prune_outbox(connection: Connection, after_seq: int, up_to_seq: int) -> int:
    """Delete the outbox rows up to `up_to_seq`, which are on their streams; return the count."""
    return int(connection.execute(delete(outbox).where(outbox.c.seq <= up_to_seq)).rowcount)


async def relay_once(
    engine: Engine, client: "redis.Redis", *, batch_size: int, name: str = CHECKPOINT_NAME
) -> int:
    """Append the next batch of outbox rows to their streams and return how many were appended.

    Raises the Redis or SQLite error when the append or the checkpoint fails. The checkpoint then
    stays where it was, so the next round appends the same rows again.
    """
    checkpoint, rows = await asyncio.to_thread(_read_batch, engine, name, batch_size)
    if not rows:
        return 0
    async with client.pipeline(transaction=True) as pipe:
        for _seq, stream, fields, _created_at in rows:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]  # dict is invariant
        await pipe.execute()
    observe_publish_lag(OUTBOX_RELAY_NAME, (row[3] for row in rows), now=time.time())
    last_seq = rows[-1][0]
    pruned = await asyncio.to_thread(
        lambda: relay.store_checkpoint(
            engine, relay_checkpoint, name, last_seq, prune=prune_outbox, after_seq=checkpoint
        )
    )
    log.debug(
        "outbox rows relayed",
        extra={"count": len(rows), "first_seq": rows[0][0], "last_seq": last_seq,
               "pruned": pruned},
    )
    return len(rows)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Relay outbox rows until `stop` is set, retrying with backoff while Redis or SQLite fail."""
    engine = open_write_model(settings)
    client = connect(settings.redis_url)
    ids = {"checkpoint_name": CHECKPOINT_NAME, "database_path": str(settings.database_file)}
    reporter = RelayLagReporter(
        client, OUTBOX_RELAY_NAME, lambda: asyncio.to_thread(oldest_unrelayed, engine)
    )

    async def round_and_report() -> int:
        relayed = await relay_once(engine, client, batch_size=settings.relay_batch_size)
        await reporter.maybe_report()
        return relayed

    log.info("outbox relay started", extra={**ids, "batch_size": settings.relay_batch_size})
    commit_watch = relay.CommitWatch(settings.database_file)
    try:
        await relay.run_relay(
            round_and_report,
            stop=stop,
            batch_size=settings.relay_batch_size,
            poll_interval_seconds=settings.relay_poll_interval_seconds,
            ids=ids,
            retry_base_seconds=settings.retry_base_seconds,
            retry_max_seconds=settings.retry_max_seconds,
            trim=lambda: trim_acknowledged(
                client, CQRS_STREAM, STREAM_GROUPS[CQRS_STREAM],
                retention_seconds=settings.relay_stream_retention_seconds,
            ),
            trim_interval_seconds=settings.relay_trim_interval_seconds,
            commit_watch=commit_watch,
        )
    finally:
        commit_watch.close()
        await client.aclose()
        engine.dispose()
        log.info("outbox relay stopped", extra=ids)
