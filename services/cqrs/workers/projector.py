"""Projector: fills the Redis read model from `cdc.monolith` and `events.cqrs`.

Orders and products are projected, gated by version; user events are acknowledged without a write
because the read model has no users.
"""

import asyncio
import logging

import redis.asyncio as redis

from services.shared.events import Event
from services.shared.names import CDC_STREAM, CQRS_STREAM, PROJECTOR_GROUP
from services.shared.streams import ConsumerOptions, PermanentFailure, StreamConsumer, connect
from services.shared.user_gate import applied_marker

from ..read_model import project_event
from ..settings import Settings
from ..states import InvalidState
from .common import consumer_options

log = logging.getLogger(__name__)


class Projector:
    """Stream handler that applies events to the read model."""

    def __init__(self, client: "redis.Redis", *, authority: str) -> None:
        self.client = client
        self.authority = authority

    async def __call__(self, stream: str, entry_id: str, event: Event) -> None:
        try:
            decision = await project_event(self.client, event, authority=self.authority)
        except InvalidState as error:
            raise PermanentFailure(str(error)) from error
        log.debug(
            "event projected",
            extra={
                "stream": stream,
                "entry_id": entry_id,
                "event_id": event.id,
                "subject": event.subject,
                "version": event.aggregate_version,
                "decision": None if decision is None else decision.value,
            },
        )


def build_consumer(
    settings: Settings, client: "redis.Redis", *, options: ConsumerOptions | None = None
) -> StreamConsumer:
    return StreamConsumer(
        client,
        streams=[CDC_STREAM, CQRS_STREAM],
        group=PROJECTOR_GROUP,
        consumer=settings.consumer_name,
        handler=Projector(client, authority=settings.phase.authority),
        options=options or consumer_options(settings),
        on_acknowledge=applied_marker(PROJECTOR_GROUP),
    )


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Project events until `stop` is set."""
    client = connect(settings.redis_url)
    log.info("projector started", extra={"consumer": settings.consumer_name})
    try:
        await build_consumer(settings, client).run(stop)
    finally:
        await client.aclose()
        log.info("projector stopped")
