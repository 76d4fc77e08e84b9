"""CDC ingest: applies the monolith's changes from `cdc.monolith` to the write model by version.

Only events of origin `monolith` are applied. Ingest never writes to the outbox, so a monolith
change is not published back onto `events.cqrs` and cannot echo to the monolith.
"""

import asyncio
import logging

import redis.asyncio as redis
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from services.shared.events import Event
from services.shared.names import CDC_STREAM, INGEST_GROUP, ORIGIN_MONOLITH
from services.shared.streams import (
    ConsumerOptions,
    PermanentFailure,
    StreamConsumer,
    TransientFailure,
    connect,
)
from services.shared.user_gate import applied_marker

from ..schema import open_write_model
from ..settings import Settings
from ..states import InvalidState
from ..write_model import apply_event, apply_events
from .common import consumer_options

log = logging.getLogger(__name__)


class CdcIngest:
    """Batch handler that applies monolith events to the write model.

    A batch is applied in one transaction. When that transaction fails for a reason other than
    the database itself, each event is applied again in its own transaction, so that only the
    event at fault fails and the others are acknowledged.
    """

    def __init__(self, engine: Engine, *, authority: str) -> None:
        self.engine = engine
        self.authority = authority

    async def __call__(
        self, stream: str, entries: list[tuple[str, Event]]
    ) -> list[Exception | None]:
        outcomes: list[Exception | None] = [None] * len(entries)
        batch: list[tuple[int, Event]] = []
        for index, (entry_id, event) in enumerate(entries):
            if event.origin == ORIGIN_MONOLITH:
                batch.append((index, event))
            else:
                log.warning(
                    "skipping event not of origin monolith",
                    extra={**_ids(stream, entry_id, event), "origin": event.origin},
                )
        if not batch:
            return outcomes

        try:
            decisions = await asyncio.to_thread(
                apply_events, self.engine, [event for _index, event in batch],
                authority=self.authority,
            )
        except OperationalError as error:
            failure = _write_model_unavailable(batch[0][1], error)
            for index, _event in batch:
                outcomes[index] = failure
            return outcomes
        except Exception as error:
            log.warning(
                "batch apply failed; applying its events one by one",
                extra={"stream": stream, "count": len(batch), "first_entry_id":
                       entries[batch[0][0]][0], "error": repr(error)},
            )
            await self._apply_one_by_one(stream, entries, batch, outcomes)
            return outcomes

        for (index, event), decision in zip(batch, decisions, strict=True):
            log.debug(
                "event ingested",
                extra={**_ids(stream, entries[index][0], event), "decision": decision.value},
            )
        return outcomes

    async def _apply_one_by_one(
        self,
        stream: str,
        entries: list[tuple[str, Event]],
        batch: list[tuple[int, Event]],
        outcomes: list[Exception | None],
    ) -> None:
        """Apply each event of `batch` in its own transaction and store its outcome in place."""
        for position, (index, event) in enumerate(batch):
            try:
                decision = await asyncio.to_thread(
                    apply_event, self.engine, event, authority=self.authority
                )
            except InvalidState as error:
                outcomes[index] = PermanentFailure(str(error))
                continue
            except OperationalError as error:
                # The write model is down for the rest of the batch too, so it is not attempted.
                failure = _write_model_unavailable(event, error)
                for later, _event in batch[position:]:
                    outcomes[later] = failure
                return
            except Exception as error:
                outcomes[index] = error
                continue
            log.debug(
                "event ingested",
                extra={**_ids(stream, entries[index][0], event), "decision": decision.value},
            )


def _write_model_unavailable(event: Event, error: OperationalError) -> TransientFailure:
    # The database file is locked past the busy timeout, unreadable or out of space: the write
    # model is at fault, not the event, so the consumer counts no try.
    return TransientFailure(
        f"Writing event {event.id} to the write model failed: {error.orig!r}"
    )


def _ids(stream: str, entry_id: str, event: Event) -> dict[str, object]:
    return {
        "stream": stream,
        "entry_id": entry_id,
        "event_id": event.id,
        "subject": event.subject,
        "version": event.aggregate_version,
    }


def build_consumer(
    settings: Settings,
    client: "redis.Redis",
    engine: Engine,
    *,
    options: ConsumerOptions | None = None,
) -> StreamConsumer:
    return StreamConsumer(
        client,
        streams=[CDC_STREAM],
        group=INGEST_GROUP,
        consumer=settings.consumer_name,
        batch_handler=CdcIngest(engine, authority=settings.phase.authority),
        options=options or consumer_options(settings),
        on_acknowledge=applied_marker(INGEST_GROUP),
    )


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Ingest CDC events until `stop` is set."""
    engine = open_write_model(settings)
    client = connect(settings.redis_url)
    log.info(
        "CDC ingest started",
        extra={"database_path": str(settings.database_file), "consumer": settings.consumer_name},
    )
    try:
        await build_consumer(settings, client, engine).run(stop)
    finally:
        await client.aclose()
        engine.dispose()
        log.info("CDC ingest stopped")
