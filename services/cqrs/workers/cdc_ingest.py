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
from ..write_model import apply_event
from .common import consumer_options

log = logging.getLogger(__name__)


class CdcIngest:
    """Stream handler that applies monolith events to the write model."""

    def __init__(self, engine: Engine, *, authority: str) -> None:
        self.engine = engine
        self.authority = authority

    async def __call__(self, stream: str, entry_id: str, event: Event) -> None:
        ids = {
            "stream": stream,
            "entry_id": entry_id,
            "event_id": event.id,
            "subject": event.subject,
            "version": event.aggregate_version,
        }
        if event.origin != ORIGIN_MONOLITH:
            log.warning(
                "skipping event not of origin monolith", extra={**ids, "origin": event.origin}
            )
            return
        try:
            decision = await asyncio.to_thread(
                apply_event, self.engine, event, authority=self.authority
            )
        except InvalidState as error:
            raise PermanentFailure(str(error)) from error
        except OperationalError as error:
            # The database file is locked past the busy timeout, unreadable or out of space: the
            # write model is at fault, not the event, so the try is not counted.
            raise TransientFailure(
                f"Writing event {event.id} to the write model failed: {error.orig!r}"
            ) from error
        log.debug("event ingested", extra={**ids, "decision": decision.value})


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
        handler=CdcIngest(engine, authority=settings.phase.authority),
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
