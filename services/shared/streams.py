"""Redis Streams: appending events, consumer groups that apply them at least once, and trimming.

A `StreamConsumer` reads its group's entries in batches, hands the events to a handler and
acknowledges them only after the handler applied them: a `Handler` takes one entry at a time, a
`BatchHandler` a whole batch of one stream. The entries of a batch that applied are acknowledged
together in one MULTI/EXEC. Entries left pending by a consumer that died are claimed after
`claim_idle_ms`, looked for every `claim_idle_ms / 2`. A consumer reads its own pending entries
again only after it starts, reconnects or fails on an entry, because otherwise it has none. What
happens after a handler error depends on its kind, and one entry's error never holds back the
acknowledgement of the others in its batch:

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

When `stop` is set the consumer finishes and acknowledges the entry in hand (a `BatchHandler`'s
whole batch), and releases the entries of its batch that it has not started, so that another
consumer claims them at once.
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
# Applies a batch of one stream's entries, in order, given as (entry id, event) pairs. Returns one
# outcome per entry: None when it applied, or the exception that applying it raised, which the
# consumer treats as if a `Handler` had raised it. An entry not attempted because a dependency went
# down gets a `TransientFailure`. Raising instead fails the whole batch, which stays pending.
BatchHandler = Callable[[str, list[tuple[str, Event]]], Awaitable[list[Exception | None]]]
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
    batch_size: int = 500
    retry_base_seconds: float = 0.2
    retry_max_seconds: float = 10.0
    # Time the entry in hand may take to finish after a stop request. After it the entry is
    # abandoned unacknowledged and another consumer claims it after `claim_idle_ms`.
    shutdown_grace_seconds: float = 5.0


class StreamConsumer:
    """One consumer in a group over one or more streams.

    Give either `handler` or `batch_handler`.
    """

    def __init__(
        self,
        client: "redis.Redis",
        *,
        streams: list[str],
        group: str,
        consumer: str,
        handler: Handler | None = None,
        batch_handler: BatchHandler | None = None,
        options: ConsumerOptions | None = None,
        on_acknowledge: AckHook | None = None,
    ) -> None:
        if (handler is None) == (batch_handler is None):
            raise ValueError(
                f"Consumer {consumer!r} of group {group!r} needs exactly one of handler and "
                "batch_handler."
            )
        self.client = client
        self.streams = streams
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.batch_handler = batch_handler
        self.options = options or ConsumerOptions()
        self.on_acknowledge = on_acknowledge
        self._stop = asyncio.Event()  # replaced by the event given to `run`
        self._outages = 0
        self._transient_failures = 0
        self._backing_off = False
        self._reread_pending = True
        self._next_claim = 0.0  # time.monotonic() of the next look for idle entries
        # Per stream, where an unfinished XAUTOCLAIM scan continues; absent once a scan is done.
        self._claim_cursors: dict[str, str] = {}

    async def setup(self) -> None:
        """Create the groups, and read this consumer's pending entries and idle ones next poll."""
        for stream in self.streams:
            await ensure_group(self.client, stream, self.group)
        self._reread_pending = True
        self._next_claim = 0.0

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
        """Handle a batch of new entries, after this consumer's pending entries when they may
        exist and idle entries of other consumers when a look for them is due.

        The read of new entries blocks up to `block_ms`, so an idle consumer wakes as soon as an
        entry arrives. Returns the number of entries handled successfully.
        """
        self._backing_off = False
        handled = 0
        if self._reread_pending:
            handled += await self._handle_pending()
        if self._claim_cursors or time.monotonic() >= self._next_claim:
            handled += await self._claim_idle()
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

    async def _handle_pending(self) -> int:
        """Handle entries delivered to this consumer but not acknowledged: those of a previous
        run, of a failed attempt, or left behind by a backoff."""
        if self._stop.is_set():
            return 0
        pending: Any = await self.client.xreadgroup(
            self.group,
            self.consumer,
            {stream: "0" for stream in self.streams},
            count=self.options.batch_size,
        )
        if not any(entries for _stream, entries in pending or []):
            self._reread_pending = False
            return 0
        # Stays set: the next poll reads again, until a read finds nothing pending.
        return await self._handle_batch(pending)

    async def _claim_idle(self) -> int:
        """Claim and handle entries idle for `claim_idle_ms`, continuing an unfinished scan."""
        handled = 0
        for stream in self.streams:
            if self._stop.is_set() or self._backing_off:
                return handled
            reply = await self.client.xautoclaim(
                stream,
                self.group,
                self.consumer,
                min_idle_time=self.options.claim_idle_ms,
                start_id=self._claim_cursors.get(stream, "0-0"),
                count=self.options.batch_size,
            )
            cursor, claimed = str(reply[0]), reply[1]
            if cursor == "0-0":
                self._claim_cursors.pop(stream, None)
            else:
                self._claim_cursors[stream] = cursor
            if claimed:
                log.info(
                    "claimed idle entries",
                    extra={**self._ids(), "stream": stream, "count": len(claimed)},
                )
                handled += await self._handle_batch([[stream, claimed]])
        if not self._claim_cursors:
            self._next_claim = time.monotonic() + self.options.claim_idle_ms / 2000
        return handled

    async def _handle_batch(self, batch: Any) -> int:
        handled = 0
        for stream, entries in batch or []:
            if self._stop.is_set():
                await self._release(stream, [entry_id for entry_id, _fields in entries])
                continue
            if self._backing_off:
                # The entries stay pending for this consumer and are read again next poll.
                return handled
            handled += await self._handle_entries(stream, entries)
        return handled

    async def _handle_entries(self, stream: str, entries: list[tuple[str, Any]]) -> int:
        """Apply one stream's entries, acknowledge those that applied in one transaction, then
        count a try for, dead-letter or back off on those that failed."""
        # Deleted entries and replays meant for another group are acknowledged unhandled, and
        # only the replays count as handled.
        skipped: list[str] = []
        replays = 0
        failed: list[_Failure] = []
        parsed: list[tuple[str, dict[str, str], Event]] = []
        for entry_id, fields in entries:
            if fields is None:  # deleted from the stream while pending
                skipped.append(entry_id)
                continue
            replay_group = fields.get(REPLAY_GROUP_FIELD)
            if replay_group is not None and replay_group != self.group:
                skipped.append(entry_id)
                replays += 1
                continue
            try:
                parsed.append((entry_id, fields, Event.from_fields(fields)))
            except EnvelopeError as error:
                failed.append(_Failure(entry_id, fields, error))

        outcomes = await self._apply(stream, parsed)
        applied: list[tuple[str, Event]] = []
        for (entry_id, fields, event), outcome in zip(parsed, outcomes, strict=False):
            if outcome is None:
                applied.append((entry_id, event))
            else:
                failed.append(_Failure(entry_id, fields, outcome))

        await self._acknowledge(stream, skipped, applied)
        unstarted = [entry_id for entry_id, _fields, _event in parsed[len(outcomes):]]
        if unstarted and self._stop.is_set():
            await self._release(stream, unstarted)
        elif unstarted:
            self._reread_pending = True  # left pending behind a backoff
        if applied:
            self._transient_failures = 0
        await self._handle_failures(stream, failed)
        return len(applied) + replays

    async def _apply(
        self, stream: str, parsed: list[tuple[str, dict[str, str], Event]]
    ) -> list[Exception | None]:
        """Return the outcome of each entry, in order, for a prefix of `parsed`.

        The prefix is shorter than `parsed` when the handler stopped before the rest: a stop
        request, or a dependency outage that makes the rest fail too.
        """
        if not parsed:
            return []
        if self.batch_handler is not None:
            outcomes = await self.batch_handler(
                stream, [(entry_id, event) for entry_id, _fields, event in parsed]
            )
            if len(outcomes) != len(parsed):
                raise RuntimeError(
                    f"The batch handler of group {self.group!r} returned {len(outcomes)} "
                    f"outcomes for {len(parsed)} entries of {stream}; it must return one per entry."
                )
            return outcomes
        assert self.handler is not None
        results: list[Exception | None] = []
        for entry_id, _fields, event in parsed:
            if self._stop.is_set():
                break
            try:
                await self.handler(stream, entry_id, event)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError):
                raise
            except TransientFailure as error:
                results.append(error)
                break
            except Exception as error:
                results.append(error)
                continue
            results.append(None)
        return results

    async def _acknowledge(
        self, stream: str, skipped: list[str], applied: list[tuple[str, Event]]
    ) -> None:
        """Acknowledge entries in one transaction, with `on_acknowledge` for each applied one."""
        entry_ids = skipped + [entry_id for entry_id, _event in applied]
        if not entry_ids:
            return
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(stream, self.group, *entry_ids)
            pipe.hdel(failure_counts_key(stream, self.group), *entry_ids)
            if self.on_acknowledge is not None:
                for entry_id, event in applied:
                    self.on_acknowledge(pipe, stream, entry_id, event)
            await pipe.execute()
        now_ms = time.time() * 1000
        lag = APPLY_LAG.labels(stream, self.group)
        for entry_id, _event in applied:
            lag.observe(max(now_ms - parse_entry_id(entry_id)[0], 0) / 1000)

    async def _handle_failures(self, stream: str, failed: list["_Failure"]) -> None:
        """Dead-letter the entries that cannot succeed and count a try for the others, then wait
        once before they are read again."""
        if not failed:
            return
        self._reread_pending = True
        transient: _Failure | None = None
        max_tries = 0
        for failure in failed:
            error = failure.error
            if isinstance(error, TransientFailure):
                transient = transient or failure
                continue
            tries = await self._count_failure(stream, failure.entry_id)
            if isinstance(error, EnvelopeError | PermanentFailure) or (
                tries >= self.options.max_tries
            ):
                await self._dead_letter(stream, failure.entry_id, failure.fields, error,
                                        tries=tries)
                continue
            max_tries = max(max_tries, tries)
            log.warning(
                "event handling failed; will retry",
                extra={
                    **self._ids(),
                    "stream": stream,
                    "entry_id": failure.entry_id,
                    "tries": tries,
                    "max_tries": self.options.max_tries,
                    "error": repr(error),
                },
            )
        if transient is not None:
            await self._back_off(stream, transient.entry_id, transient.error)
        elif max_tries:
            await sleep_unless_stopped(self._stop, self._backoff(max_tries))

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


@dataclass(frozen=True)
class _Failure:
    entry_id: str
    fields: dict[str, str]
    error: Exception
