"""Redis Streams: appending events, and consumer groups that apply them at least once.

A `StreamConsumer` reads its groups' new entries, hands each event to a handler and acknowledges it
only after the handler returns. Entries left pending by a consumer that died are claimed after
`claim_idle_ms`. A handler error leaves the entry pending, to be retried with backoff. After
`max_tries` deliveries, or at once for a `PermanentFailure`, the entry moves to `<stream>.dlq` with
the error and is acknowledged. Handlers must be idempotent, which version-gated apply makes them.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis import exceptions as redis_errors

from .clock import utc_now
from .events import EnvelopeError, Event
from .names import dead_letter_stream
from .retry import backoff_seconds, sleep_unless_stopped

log = logging.getLogger(__name__)


class PermanentFailure(Exception):
    """A handler error that retrying cannot fix; the entry goes to the dead-letter stream now."""


Handler = Callable[[str, str, Event], Awaitable[None]]


def connect(url: str) -> "redis.Redis":
    """Return a Redis client that decodes replies to str and retries dropped connections."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=10,
        socket_connect_timeout=5,
        retry_on_error=[redis_errors.ConnectionError],
    )


async def append(client: "redis.Redis", stream: str, event: Event) -> str:
    """Append `event` to `stream` and return the entry id."""
    entry_id = await client.xadd(stream, event.to_fields())  # type: ignore[arg-type]
    return str(entry_id)


async def ensure_group(client: "redis.Redis", stream: str, group: str) -> None:
    """Create `group` on `stream` at id 0, so entries appended before it existed are delivered."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
        log.info("consumer group created", extra={"stream": stream, "group": group})
    except redis_errors.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


@dataclass
class ConsumerOptions:
    max_tries: int = 5
    claim_idle_ms: int = 30_000
    block_ms: int = 1_000
    batch_size: int = 100
    retry_base_seconds: float = 0.2
    retry_max_seconds: float = 10.0


class StreamConsumer:
    """One consumer in a group over one or more streams."""

    def __init__(
        self,
        client: "redis.Redis",
        *,
        streams: list[str],
        group: str,
        consumer: str,
        handler: Handler,
        options: ConsumerOptions | None = None,
    ) -> None:
        self.client = client
        self.streams = streams
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.options = options or ConsumerOptions()
        self._failures = 0

    async def setup(self) -> None:
        for stream in self.streams:
            await ensure_group(self.client, stream, self.group)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, surviving Redis outages with backoff."""
        log.info("consumer started", extra=self._ids())
        connected = False
        while not stop.is_set():
            try:
                if not connected:
                    await self.setup()
                    connected = True
                await self.poll()
                self._failures = 0
            except (
                redis_errors.ConnectionError,
                redis_errors.TimeoutError,
                OSError,
            ) as error:
                connected = False
                self._failures += 1
                delay = self._backoff(self._failures)
                log.warning(
                    "Redis unavailable; retrying",
                    extra={**self._ids(), "error": str(error), "retry_in_s": round(delay, 2)},
                )
                await sleep_unless_stopped(stop, delay)
        log.info("consumer stopped", extra=self._ids())

    async def poll(self) -> int:
        """Handle this consumer's pending entries, idle ones claimed from others, then new ones.

        Returns the number of entries handled successfully.
        """
        handled = 0
        for stream in self.streams:
            pending = await self.client.xreadgroup(
                self.group, self.consumer, {stream: "0"}, count=self.options.batch_size
            )
            handled += await self._handle_batch(pending)
            handled += await self._claim_idle(stream)
        fresh = await self.client.xreadgroup(
            self.group,
            self.consumer,
            {stream: ">" for stream in self.streams},
            count=self.options.batch_size,
            block=self.options.block_ms,
        )
        handled += await self._handle_batch(fresh)
        return handled

    async def _claim_idle(self, stream: str) -> int:
        reply = await self.client.xautoclaim(
            stream,
            self.group,
            self.consumer,
            min_idle_time=self.options.claim_idle_ms,
            start_id="0-0",
            count=self.options.batch_size,
        )
        claimed = reply[1]
        if claimed:
            log.info(
                "claimed idle entries",
                extra={**self._ids(), "stream": stream, "count": len(claimed)},
            )
        return await self._handle_batch([[stream, claimed]])

    async def _handle_batch(self, batch: Any) -> int:
        handled = 0
        for stream, entries in batch or []:
            for entry_id, fields in entries:
                if fields is None:  # deleted from the stream while pending
                    await self.client.xack(stream, self.group, entry_id)
                    continue
                if await self._handle_entry(stream, entry_id, fields):
                    handled += 1
        return handled

    async def _handle_entry(self, stream: str, entry_id: str, fields: dict[str, str]) -> bool:
        try:
            event = Event.from_fields(fields)
            await self.handler(stream, entry_id, event)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError):
            raise
        except (EnvelopeError, PermanentFailure) as error:
            await self._dead_letter(
                stream, entry_id, fields, error, tries=await self._tries(stream, entry_id)
            )
            return False
        except Exception as error:
            tries = await self._tries(stream, entry_id)
            if tries >= self.options.max_tries:
                await self._dead_letter(stream, entry_id, fields, error, tries=tries)
                return False
            delay = self._backoff(tries)
            log.warning(
                "event handling failed; will retry",
                extra={
                    **self._ids(),
                    "stream": stream,
                    "entry_id": entry_id,
                    "tries": tries,
                    "error": repr(error),
                    "retry_in_s": round(delay, 2),
                },
            )
            await asyncio.sleep(delay)
            return False
        await self.client.xack(stream, self.group, entry_id)
        return True

    async def _tries(self, stream: str, entry_id: str) -> int:
        rows = await self.client.xpending_range(
            stream, self.group, min=entry_id, max=entry_id, count=1
        )
        return int(rows[0]["times_delivered"]) if rows else 1

    async def _dead_letter(
        self, stream: str, entry_id: str, fields: dict[str, str], error: Exception, *, tries: int
    ) -> None:
        dead = {
            **fields,
            "dlq_stream": stream,
            "dlq_entry_id": entry_id,
            "dlq_group": self.group,
            "dlq_consumer": self.consumer,
            "dlq_tries": str(tries),
            "dlq_error": f"{type(error).__name__}: {error}",
            "dlq_time": utc_now(),
        }
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(dead_letter_stream(stream), dead)  # type: ignore[arg-type]
            pipe.xack(stream, self.group, entry_id)
            await pipe.execute()
        log.error(
            "event dead-lettered",
            extra={
                **self._ids(),
                "stream": stream,
                "entry_id": entry_id,
                "tries": tries,
                "error": repr(error),
            },
        )

    def _backoff(self, attempt: int) -> float:
        return backoff_seconds(
            attempt, base=self.options.retry_base_seconds, maximum=self.options.retry_max_seconds
        )

    def _ids(self) -> dict[str, Any]:
        return {"group": self.group, "consumer": self.consumer, "streams": self.streams}
