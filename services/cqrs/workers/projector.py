"""Projector: fills the Redis read model from `cdc.monolith` and `events.cqrs`.

Orders and products are projected, gated by version; user events are acknowledged without a write
because the read model has no users.
"""

import asyncio
import logging

import redis.asyncio as redis

from services.shared.consistency import Decision
from services.shared.events import Event
from services.shared.names import CDC_STREAM, CQRS_STREAM, PROJECTOR_GROUP
from services.shared.streams import (
    REDIS_OUTAGE_ERRORS,
    ConsumerOptions,
    PermanentFailure,
    StreamConsumer,
    connect,
)
from services.shared.user_gate import applied_marker

from ..read_model import project_event, project_events
from ..settings import Settings
from ..states import InvalidState
from .common import consumer_options

log = logging.getLogger(__name__)


class Projector:
    """Batch handler that applies events to the read model.

    A batch is projected in one WATCH/MULTI. When that fails for a reason other than Redis being
    unreachable, each event is projected on its own, so that only the event at fault fails and the
    others are acknowledged.
    """

    def __init__(self, client: "redis.Redis", *, authority: str) -> None:
        self.client = client
        self.authority = authority

    async def __call__(
        self, stream: str, entries: list[tuple[str, Event]]
    ) -> list[Exception | None]:
        events = [event for _entry_id, event in entries]
        try:
            decisions = await project_events(self.client, events, authority=self.authority)
        except REDIS_OUTAGE_ERRORS:
            raise
        except Exception as error:
            log.warning(
                "batch projection failed; projecting its events one by one",
                extra={"stream": stream, "count": len(entries), "first_entry_id": entries[0][0],
                       "error": repr(error)},
            )
            return [await self._project_one(stream, entry_id, event)
                    for entry_id, event in entries]
        for (entry_id, event), decision in zip(entries, decisions, strict=True):
            _log_projected(stream, entry_id, event, decision)
        return [None] * len(entries)

    async def _project_one(self, stream: str, entry_id: str, event: Event) -> Exception | None:
        try:
            decision = await project_event(self.client, event, authority=self.authority)
        except REDIS_OUTAGE_ERRORS:
            raise
        except InvalidState as error:
            return PermanentFailure(str(error))
        except Exception as error:
            return error
        _log_projected(stream, entry_id, event, decision)
        return None


def _log_projected(stream: str, entry_id: str, event: Event, decision: Decision | None) -> None:
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
        batch_handler=Projector(client, authority=settings.phase.authority),
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
