"""Redis Streams: appending events, consumer groups that apply them at least once, and trimming.

A `StreamConsumer` reads its group's entries, hands each event to a handler and acknowledges it
only after the handler returns. Entries left pending by a consumer that died are claimed after
`claim_idle_ms`. What happens after a handler error depends on its kind:

- `TransientFailure`, or Redis itself unreachable: a dependency is down. The entry stays pending
  and the consumer backs off and retries it for as long as the outage lasts, without counting a
  try, because the entry is not at fault.
- `PermanentFailure` or an invalid envelope: retrying cannot help, so the entry moves to
  `<stream>.dlq` at once.
- Any other exception: the entry stays pending and is retried with backoff. After `max_tries`
  failed attempts it moves to `<stream>.dlq` with the error, the consumer and the try count, and
  is acknowledged, so the consumer moves on.

Failed attempts are counted in a Redis hash (`failure_counts_key`) rather than taken from the
delivery count, because every read of a consumer's pending entries and every claim raises the
delivery count.

When `stop` is set the consumer finishes and acknowledges the entry in hand, and releases the
entries of its batch that it has not started, so that another consumer claims them at once.
Handlers must be idempotent, which version-gated apply makes them.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from prometheus_client import Histogram
from redis import exceptions as redis_errors
from redis.asyncio.client import Pipeline

from .clock import utc_now
from .events import EnvelopeError, Event
from .names import dead_letter_stream, failure_counts_key
from .retry import backoff_seconds, sleep_unless_stopped

log = logging.getLogger(__name__)

# Errors that mean Redis cannot be reached; consumers and relays wait for it to come back.
REDIS_OUTAGE_ERRORS = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)

# Fields that a dead-letter entry carries besides the original entry's fields.
DLQ_FIELD_PREFIX = "dlq_"
# Set on an entry replayed from a dead-letter stream: only this group handles it, and every other
# group on the stream acknowledges it unhandled, so a replay reaches only the group that failed.
REPLAY_GROUP_FIELD = "replay_group"
REPLAYED_FROM_FIELD = "replayed_from"


class TransientFailure(Exception):
    """A handler error caused by an unavailable dependency; retried without counting a try."""


class PermanentFailure(Exception):
    """A handler error that retrying cannot fix; the entry goes to the dead-letter stream now."""


Handler = Callable[[str, str, Event], Awaitable[None]]
# Queues more commands into the transaction that acknowledges a handled entry; called with the
# pipeline, the stream, the entry id and the event. Those commands then happen exactly when the
# acknowledgement does.
AckHook = Callable[[Pipeline, str, str, Event], None]

# From the append to the acknowledgement of a handled entry: the projection lag for the projector
# group, the reverse-sync lag for the reverse-sync group, the ingest lag for the ingest group.
APPLY_LAG = Histogram(
    "ztcqrs_apply_lag_seconds",
    "Time from an entry's append to its stream until the consumer group applied and "
    "acknowledged it.",
    ["stream", "group"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)


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


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """Return a stream entry id `<ms>-<seq>` as a pair that sorts like the stream does."""
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


async def trim_acknowledged(
    client: "redis.Redis", stream: str, groups: tuple[str, ...], *, retention_seconds: float = 0.0
) -> int:
    """Remove the entries of `stream` that every consumer group has acknowledged.

    A group's floor is its oldest pending entry, or the last entry delivered to it when none is
    pending. Entries older than the lowest floor of all groups on the stream are removed, unless
    they were appended less than `retention_seconds` ago by the Redis server's clock. Missing
    `groups` are created first, so a consumer that has not started yet loses nothing. A floor only
    moves forward, because a group reads only entries after its last delivered id, so the floors
    can be read before the trim. Returns the number of entries removed.
    """
    for group in groups:
        await ensure_group(client, stream, group)
    floors: list[str] = []
    if retention_seconds > 0:
        seconds, microseconds = await client.time()
        now_ms = int(seconds) * 1000 + int(microseconds) // 1000
        floors.append(f"{max(now_ms - int(retention_seconds * 1000), 0)}-0")
    for info in await client.xinfo_groups(stream):
        floor = str(info["last-delivered-id"])
        if int(info["pending"]) > 0:
            summary = await client.xpending(stream, info["name"])
            # The group may have acknowledged everything since XINFO; then nothing is pending
            # and the last delivered id read above is a safe floor.
            if summary["min"] is not None:
                floor = str(summary["min"])
        floors.append(floor)
    if not floors:
        return 0
    removed = int(await client.xtrim(stream, minid=min(floors, key=parse_entry_id),
                                     approximate=False))
    if removed:
        log.debug("stream trimmed", extra={"stream": stream, "removed": removed})
    return removed


@dataclass
class ConsumerOptions:
    max_tries: int = 5
    claim_idle_ms: int = 30_000
    block_ms: int = 1_000
    batch_size: int = 100
    retry_base_seconds: float = 0.2
    retry_max_seconds: float = 10.0
    # Time the entry in hand may take to finish after a stop request. After it the entry is
    # abandoned unacknowledged and another consumer claims it after `claim_idle_ms`.
    shutdown_grace_seconds: float = 5.0


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
        on_acknowledge: AckHook | None = None,
    ) -> None:
        self.client = client
        self.streams = streams
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.options = options or ConsumerOptions()
        self.on_acknowledge = on_acknowledge
        self._stop = asyncio.Event()  # replaced by the event given to `run`
        self._outages = 0
        self._transient_failures = 0
        self._backing_off = False

    async def setup(self) -> None:
        for stream in self.streams:
            await ensure_group(self.client, stream, self.group)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, surviving Redis outages with backoff."""
        self._stop = stop
        log.info("consumer started", extra=self._ids())
        connected = False
        while not stop.is_set():
            try:
                if not connected:
                    await self.setup()
                    connected = True
                await self._poll_within_grace(stop)
                self._outages = 0
            except REDIS_OUTAGE_ERRORS as error:
                connected = False
                self._outages += 1
                delay = self._backoff(self._outages)
                log.warning(
                    "Redis unavailable; retrying",
                    extra={**self._ids(), "error": str(error), "retry_in_s": round(delay, 2)},
                )
                await sleep_unless_stopped(stop, delay)
            except redis_errors.ResponseError as error:
                # A group deleted by hand, or a Redis that lost its data, has no group any more.
                if "NOGROUP" not in str(error):
                    raise
                connected = False
                log.warning(
                    "consumer group missing; creating it again",
                    extra={**self._ids(), "error": str(error)},
                )
        log.info("consumer stopped", extra=self._ids())

    async def _poll_within_grace(self, stop: asyncio.Event) -> None:
        """Run one `poll`; once `stop` is set, give it `shutdown_grace_seconds` to finish."""
        round_task = asyncio.ensure_future(self.poll())
        stop_task = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({round_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if not round_task.done():
                await asyncio.wait({round_task}, timeout=self.options.shutdown_grace_seconds)
            if not round_task.done():
                log.warning(
                    "entry in hand abandoned at shutdown; it stays pending and is claimed later",
                    extra={**self._ids(), "grace_s": self.options.shutdown_grace_seconds},
                )
                return
            round_task.result()
        finally:
            stop_task.cancel()
            if not round_task.done():
                round_task.cancel()
                await asyncio.wait({round_task})

    async def poll(self) -> int:
        """Handle this consumer's pending entries, idle ones claimed from others, then new ones.

        Returns the number of entries handled successfully.
        """
        self._backing_off = False
        handled = 0
        for stream in self.streams:
            if self._stop.is_set() or self._backing_off:
                return handled
            pending = await self.client.xreadgroup(
                self.group, self.consumer, {stream: "0"}, count=self.options.batch_size
            )
            handled += await self._handle_batch(pending)
            handled += await self._claim_idle(stream)
        if self._stop.is_set() or self._backing_off:
            return handled
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
        if self._stop.is_set() or self._backing_off:
            return 0
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
            for index, (entry_id, fields) in enumerate(entries):
                if self._stop.is_set():
                    await self._release(stream, [later for later, _ in entries[index:]])
                    return handled
                if self._backing_off:
                    # The entries stay pending for this consumer and are read again next poll.
                    return handled
                if fields is None:  # deleted from the stream while pending
                    await self._acknowledge(stream, entry_id)
                    continue
                if await self._handle_entry(stream, entry_id, fields):
                    handled += 1
        return handled

    async def _handle_entry(self, stream: str, entry_id: str, fields: dict[str, str]) -> bool:
        replay_group = fields.get(REPLAY_GROUP_FIELD)
        if replay_group is not None and replay_group != self.group:
            await self._acknowledge(stream, entry_id)
            return True
        try:
            event = Event.from_fields(fields)
            await self.handler(stream, entry_id, event)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError):
            raise
        except TransientFailure as error:
            await self._back_off(stream, entry_id, error)
            return False
        except (EnvelopeError, PermanentFailure) as error:
            tries = await self._count_failure(stream, entry_id)
            await self._dead_letter(stream, entry_id, fields, error, tries=tries)
            return False
        except Exception as error:
            tries = await self._count_failure(stream, entry_id)
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
                    "max_tries": self.options.max_tries,
                    "error": repr(error),
                    "retry_in_s": round(delay, 2),
                },
            )
            await sleep_unless_stopped(self._stop, delay)
            return False
        await self._acknowledge(stream, entry_id, event)
        APPLY_LAG.labels(stream, self.group).observe(
            max(time.time() * 1000 - parse_entry_id(entry_id)[0], 0) / 1000
        )
        self._transient_failures = 0
        return True

    async def _back_off(self, stream: str, entry_id: str, error: Exception) -> None:
        """Pause the rest of this poll: the dependency is down for every entry, not only this."""
        self._transient_failures += 1
        self._backing_off = True
        delay = self._backoff(self._transient_failures)
        log.warning(
            "dependency unavailable; will retry",
            extra={
                **self._ids(),
                "stream": stream,
                "entry_id": entry_id,
                "consecutive_failures": self._transient_failures,
                "error": str(error),
                "retry_in_s": round(delay, 2),
            },
        )
        await sleep_unless_stopped(self._stop, delay)

    async def _acknowledge(self, stream: str, entry_id: str, event: Event | None = None) -> None:
        """Acknowledge the entry; with the handled `event`, run `on_acknowledge` in the same
        transaction."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(stream, self.group, entry_id)
            pipe.hdel(failure_counts_key(stream, self.group), entry_id)
            if event is not None and self.on_acknowledge is not None:
                self.on_acknowledge(pipe, stream, entry_id, event)
            await pipe.execute()

    async def _count_failure(self, stream: str, entry_id: str) -> int:
        return int(await self.client.hincrby(failure_counts_key(stream, self.group), entry_id, 1))

    async def _release(self, stream: str, entry_ids: list[str]) -> None:
        """Mark unstarted entries idle for `claim_idle_ms`, so another consumer claims them now.

        JUSTID keeps the delivery count unchanged; the entries stay in this consumer's pending
        list until claimed.
        """
        if not entry_ids:
            return
        await self.client.xclaim(
            stream,
            self.group,
            self.consumer,
            min_idle_time=0,
            message_ids=entry_ids,  # type: ignore[arg-type]  # list is invariant
            idle=self.options.claim_idle_ms,
            justid=True,
        )
        log.info(
            "released unhandled entries at shutdown",
            extra={**self._ids(), "stream": stream, "count": len(entry_ids)},
        )

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
            pipe.hdel(failure_counts_key(stream, self.group), entry_id)
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
