"""Checkpointed relays from a SQLite table to Redis Streams, at least once.

Both the monolith's CDC relay (change log to `cdc.monolith`) and the CQRS outbox relay (outbox to
`events.cqrs`) read rows after a stored checkpoint, append them in one MULTI/EXEC, and only then
store the last row's `seq`. A crash between the append and the checkpoint appends the rows again,
so entries may repeat (receivers skip them by version) but never go missing.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis import exceptions as redis_errors
from sqlalchemy import Connection, Engine, Table, func, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from .retry import backoff_seconds, sleep_unless_stopped

log = logging.getLogger(__name__)

# Errors after which a relay round is retried; the checkpoint has not moved when they occur.
RETRYABLE_ERRORS = (redis_errors.RedisError, OSError, SQLAlchemyError)


def read_checkpoint(connection: Connection, table: Table, name: str) -> int:
    """Return the last relayed `seq` stored under `name`, 0 before the first round."""
    seq = connection.scalar(select(table.c.seq).where(table.c.name == name))
    return int(seq) if seq is not None else 0


def store_checkpoint(engine: Engine, table: Table, name: str, seq: int) -> None:
    """Store `seq` under `name`; MAX keeps it from moving back if two relays ever run at once."""
    statement = sqlite_insert(table).values(name=name, seq=seq)
    statement = statement.on_conflict_do_update(
        index_elements=[table.c.name],
        set_={"seq": func.max(table.c.seq, statement.excluded.seq)},
    )
    with engine.begin() as connection:
        connection.execute(statement)


async def run_relay(
    relay_once: Callable[[], Awaitable[int]],
    *,
    stop: asyncio.Event,
    batch_size: int,
    poll_interval_seconds: float,
    ids: dict[str, Any],
    retry_base_seconds: float = 0.2,
    retry_max_seconds: float = 10.0,
) -> None:
    """Call `relay_once` until `stop` is set, sleeping when a round moved less than a full batch.

    `relay_once` relays one batch and returns how many rows it moved past. A failed round is
    logged and retried with backoff.
    """
    failures = 0
    while not stop.is_set():
        try:
            relayed = await relay_once()
        except RETRYABLE_ERRORS as error:
            failures += 1
            delay = backoff_seconds(failures, base=retry_base_seconds, maximum=retry_max_seconds)
            dependency = "database" if isinstance(error, SQLAlchemyError) else "Redis"
            log.warning(
                "relay round failed; checkpoint kept, retrying",
                extra={
                    **ids,
                    "dependency": dependency,
                    "error": repr(error),
                    "consecutive_failures": failures,
                    "retry_in_s": round(delay, 2),
                },
            )
            await sleep_unless_stopped(stop, delay)
            continue
        if failures:
            log.info("relay recovered", extra={**ids, "failed_attempts": failures})
            failures = 0
        if relayed < batch_size:
            await sleep_unless_stopped(stop, poll_interval_seconds)
