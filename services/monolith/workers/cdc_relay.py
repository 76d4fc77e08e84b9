"""CDC relay: publishes the monolith's change log to the `cdc.monolith` stream, at least once.

Rows of origin `cqrs` were written by the sync API and are not published, so no change echoes back
to the CQRS side. The checkpoint still moves past them, but a round that only skipped such rows
keeps its position in memory and stores it at most once a second (`DeferredCheckpoint`). Reading
skipped rows again after a crash only skips them again, while storing every such round would add a
write transaction, and the round that its commit wakes, to each sync write.

SQLite has one writer at a time and a transaction keeps the write lock until it commits, so rows
become visible in `seq` order. A reader never sees seq n+1 while seq n is still uncommitted, and
no row can appear behind the checkpoint.

Each order change is appended together with its user's replication marker (`gate:published`, see
`services.shared.user_gate`), and every round reports the relay's lag (see
`services.shared.migration_health`) at most once a second.

Relayed rows are pruned with the checkpoint, except each id's row with the highest version, which
the triggers need (see `services.monolith.schema`). The change log therefore holds about one row
per id plus the rows not yet relayed.
"""

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from sqlalchemy import Connection, Engine, RowMapping, bindparam, select, text

from services.shared import relay
from services.shared.events import Event
from services.shared.migration_health import RelayLagReporter, observe_publish_lag
from services.shared.names import CDC_RELAY_NAME, CDC_STREAM, ORIGIN_MONOLITH, STREAM_GROUPS
from services.shared.streams import connect, trim_acknowledged
from services.shared.user_gate import order_user, queue_append_marked

from ..schema import change_log, open_database, relay_checkpoint
from ..settings import Settings
from ..store import read_connection

log = logging.getLogger(__name__)

CHECKPOINT_NAME = CDC_STREAM
# How long a position past rows that were only skipped may stay unstored.
SKIPPED_CHECKPOINT_INTERVAL_SECONDS = 1.0
EVENT_SOURCE = "/monolith/cdc"
AGGREGATES = {"orders": "order", "products": "product", "users": "user"}
ACTIONS = {"insert": "created", "update": "updated", "delete": "deleted"}


def event_for_row(row: RowMapping) -> Event:
    """Build the CloudEvents envelope of one change-log row.

    `time` is when the row changed, and `id` derives from the row's `seq`, so a row relayed twice
    after a crash carries the same event id both times.
    """
    event = Event.for_aggregate(
        source=EVENT_SOURCE,
        aggregate=AGGREGATES[row["table_name"]],
        aggregate_id=row["row_id"],
        action=ACTIONS[row["op"]],
        state=json.loads(row["row_json"]),
        origin=ORIGIN_MONOLITH,
    )
    return dataclasses.replace(event, time=row["changed_at"], id=f"monolith-change-{row['seq']}")


def read_checkpoint(engine: Engine) -> int:
    with read_connection(engine) as connection:
        return relay.read_checkpoint(connection, relay_checkpoint, CHECKPOINT_NAME)


@dataclass
class DeferredCheckpoint:
    """Position of a relay past rows it only skipped, not stored yet.

    `position` is the last `seq` moved past (0 when nothing is deferred) and `stored` the
    checkpoint when the deferral began, from which the prune starts.
    """

    interval_seconds: float = SKIPPED_CHECKPOINT_INTERVAL_SECONDS
    position: int = 0
    stored: int = 0
    since: float = 0.0

    def defer(self, stored: int, position: int) -> None:
        """Move past rows up to `position`; `stored` is the checkpoint in the database."""
        if not self.position:
            self.stored = stored
            self.since = time.monotonic()
        self.position = position

    def due(self) -> bool:
        """Return True when a deferred position has waited `interval_seconds` to be stored."""
        return bool(self.position) and time.monotonic() - self.since >= self.interval_seconds

    def clear(self) -> None:
        """Forget the deferred position, once a stored checkpoint covers it."""
        self.position = 0


# Built once, because a relay reads a batch after every commit to the database.
_CHANGES_AFTER = (
    select(change_log)
    .where(change_log.c.seq > bindparam("after_seq"))
    .order_by(change_log.c.seq)
    .limit(bindparam("limit"))
)


def _read_batch(engine: Engine, batch_size: int, position: int) -> tuple[int, list[RowMapping]]:
    """Return the stored checkpoint and up to `batch_size` rows after it and after `position`."""
    with read_connection(engine) as connection:
        stored = relay.read_checkpoint(connection, relay_checkpoint, CHECKPOINT_NAME)
        parameters = {"after_seq": max(stored, position), "limit": batch_size}
        return stored, list(connection.execute(_CHANGES_AFTER, parameters).mappings())


def oldest_unrelayed(engine: Engine, position: int = 0) -> str | None:
    """Return the `changed_at` of the oldest change-log row after the checkpoint and after
    `position`, or None."""
    with read_connection(engine) as connection:
        stored = relay.read_checkpoint(connection, relay_checkpoint, CHECKPOINT_NAME)
        after = max(stored, position)
        query = (
            select(change_log.c.changed_at)
            .where(change_log.c.seq > after)
            .order_by(change_log.c.seq)
            .limit(1)
        )
        changed_at = connection.scalar(query)
        return None if changed_at is None else str(changed_at)


# Deletes the relayed rows of the ids that the new rows touched, except each id's row with the
# highest version (the latest such row when versions tie), which the triggers read. Limiting it to
# those ids keeps each prune proportional to the batch, not to the whole log.
_PRUNE_SQL = text(
    """
    DELETE FROM change_log
    WHERE seq <= :up_to_seq
      AND (table_name, row_id) IN (
          SELECT table_name, row_id FROM change_log WHERE seq > :after_seq AND seq <= :up_to_seq
      )
      AND EXISTS (
          SELECT 1 FROM change_log AS newer
          WHERE newer.table_name = change_log.table_name
            AND newer.row_id = change_log.row_id
            AND (newer.version > change_log.version
                 OR (newer.version = change_log.version AND newer.seq > change_log.seq))
      )
    """
)


def prune_change_log(connection: Connection, after_seq: int, up_to_seq: int) -> int:
    """Delete superseded change-log rows up to `up_to_seq`; return how many were deleted."""
    result = connection.execute(_PRUNE_SQL, {"after_seq": after_seq, "up_to_seq": up_to_seq})
    return int(result.rowcount)


async def relay_once(
    engine: Engine,
    client: "aioredis.Redis",
    *,
    batch_size: int,
    deferred: DeferredCheckpoint | None = None,
) -> int:
    """Publish one batch after the checkpoint, then store the checkpoint.

    Returns the number of change-log rows the checkpoint moved past, published or skipped. A Redis
    error propagates before the checkpoint moves, so the batch is read again on the next call.
    With `deferred`, a batch of only skipped rows moves `deferred` instead, and its checkpoint is
    stored once it is due or with the next published batch.
    """
    position = deferred.position if deferred is not None else 0
    stored, rows = await asyncio.to_thread(_read_batch, engine, batch_size, position)
    if not rows:
        if deferred is not None and deferred.due():
            await _store(engine, deferred.position, after_seq=deferred.stored)
            deferred.clear()
        return 0
    published = [row for row in rows if row["origin"] == ORIGIN_MONOLITH]
    last_seq = int(rows[-1]["seq"])
    if not published and deferred is not None:
        deferred.defer(stored, last_seq)
        if not deferred.due():
            return len(rows)
    events = [event_for_row(row) for row in published]
    if events:
        async with client.pipeline(transaction=True) as pipe:
            for event in events:
                user_id = order_user(event.aggregate, event.data)
                if user_id is None:
                    pipe.xadd(CDC_STREAM, event.to_fields())  # type: ignore[arg-type]
                else:
                    queue_append_marked(pipe, CDC_STREAM, user_id, event.to_fields())
            await pipe.execute()
        observe_publish_lag(
            CDC_RELAY_NAME, (row["changed_at"] for row in published), now=time.time()
        )
    after_seq = int(rows[0]["seq"]) - 1
    if deferred is not None and deferred.position:
        after_seq = deferred.stored
    pruned = await _store(engine, last_seq, after_seq=after_seq)
    if deferred is not None:
        deferred.clear()
    log.debug(
        "change-log batch relayed",
        extra={
            "first_seq": rows[0]["seq"],
            "last_seq": last_seq,
            "published": len(events),
            "skipped": len(rows) - len(events),
            "pruned": pruned,
            "stream": CDC_STREAM,
        },
    )
    return len(rows)


async def _store(engine: Engine, seq: int, *, after_seq: int) -> int:
    """Store checkpoint `seq` and prune the change log in (`after_seq`, `seq`]."""
    return await asyncio.to_thread(
        lambda: relay.store_checkpoint(
            engine, relay_checkpoint, CHECKPOINT_NAME, seq, prune=prune_change_log,
            after_seq=after_seq,
        )
    )


async def store_deferred(engine: Engine, deferred: DeferredCheckpoint, ids: dict[str, str]) -> None:
    """Store a deferred checkpoint at stop, logging a failure instead of raising it.

    A failure loses nothing, because the next start reads the skipped rows again.
    """
    if not deferred.position:
        return
    try:
        await _store(engine, deferred.position, after_seq=deferred.stored)
    except relay.RETRYABLE_ERRORS as error:
        log.warning(
            "storing the checkpoint past skipped rows failed at stop; they are read again at start",
            extra={**ids, "checkpoint": deferred.position, "error": repr(error)},
        )
        return
    deferred.clear()


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Relay the change log until `stop` is set; retry with backoff while Redis or SQLite fail."""
    engine = await asyncio.to_thread(open_database, settings)
    client = connect(settings.redis_url)
    ids = {
        "stream": CDC_STREAM,
        "checkpoint_name": CHECKPOINT_NAME,
        "database": str(settings.resolved_database_path),
    }
    checkpoint = await asyncio.to_thread(read_checkpoint, engine)
    deferred = DeferredCheckpoint()
    reporter = RelayLagReporter(
        client, CDC_RELAY_NAME,
        lambda: asyncio.to_thread(oldest_unrelayed, engine, deferred.position),
    )

    async def round_and_report() -> int:
        relayed = await relay_once(
            engine, client, batch_size=settings.relay_batch_size, deferred=deferred
        )
        await reporter.maybe_report()
        return relayed

    log.info("CDC relay started", extra={**ids, "checkpoint": checkpoint})
    commit_watch = relay.CommitWatch(settings.resolved_database_path)
    try:
        await relay.run_relay(
            round_and_report,
            stop=stop,
            batch_size=settings.relay_batch_size,
            poll_interval_seconds=settings.relay_poll_interval_seconds,
            ids=ids,
            retry_base_seconds=settings.relay_retry_base_seconds,
            retry_max_seconds=settings.relay_retry_max_seconds,
            trim=lambda: trim_acknowledged(
                client, CDC_STREAM, STREAM_GROUPS[CDC_STREAM],
                retention_seconds=settings.relay_stream_retention_seconds,
            ),
            trim_interval_seconds=settings.relay_trim_interval_seconds,
            commit_watch=commit_watch,
        )
        await store_deferred(engine, deferred, ids)
    finally:
        commit_watch.close()
        await client.aclose()
        engine.dispose()
        log.info("CDC relay stopped", extra=ids)
