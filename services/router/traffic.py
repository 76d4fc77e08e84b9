"""Per-process traffic counters of the router, updated in O(1) per request.

`ErrorWindow` counts the calls to the CQRS service and their failures per second in a ring
buffer, for the guard's error rate. `SplitCounter` counts the responses per target per 10-second
bucket in memory. The guard's background loop flushes those counts into one Redis hash per bucket
(`names.gray_split_key`), so the status sums every router process and replica. `read_split` reads
the last 10 minutes back.
"""

import logging
from typing import Any

import redis.asyncio as redis

from services.shared.names import (
    GRAY_SPLIT_BUCKET_SECONDS,
    GRAY_SPLIT_BUCKET_TTL_SECONDS,
    gray_split_key,
)

from .rules import MAX_ERROR_WINDOW_SECONDS, TARGETS

log = logging.getLogger(__name__)

# The status shows this many buckets: 10 minutes of 10-second buckets.
SPLIT_BUCKETS = 60


class ErrorWindow:
    """Calls and failed calls per second over the last `MAX_ERROR_WINDOW_SECONDS` seconds.

    Each slot remembers the second it counts, so a slot left over from an earlier pass of the
    ring is reset on its first use instead of by a timer.
    """

    def __init__(self, size: int = MAX_ERROR_WINDOW_SECONDS) -> None:
        self._size = size
        self._seconds = [-1] * size
        self._calls = [0] * size
        self._failures = [0] * size

    def count(self, second: int, *, failed: bool) -> None:
        slot = second % self._size
        if self._seconds[slot] != second:
            self._seconds[slot] = second
            self._calls[slot] = 0
            self._failures[slot] = 0
        self._calls[slot] += 1
        if failed:
            self._failures[slot] += 1

    def totals(self, now: int, window: int, *, since: float | None = None) -> tuple[int, int]:
        """Return (calls, failures) in the `window` seconds up to and including second `now`.

        Seconds before `since` (epoch seconds) are left out, so failures seen before a reset of
        the guard do not trip it again.
        """
        first = now - min(window, self._size) + 1
        if since is not None:
            first = max(first, int(since) + 1)
        calls = failures = 0
        for slot in range(self._size):
            second = self._seconds[slot]
            if first <= second <= now:
                calls += self._calls[slot]
                failures += self._failures[slot]
        return calls, failures


class SplitCounter:
    """Responses per (bucket start, target) not yet flushed to Redis."""

    def __init__(self) -> None:
        self._counts: dict[tuple[int, str], int] = {}

    def count(self, now: float, target: str) -> None:
        key = (int(now) // GRAY_SPLIT_BUCKET_SECONDS * GRAY_SPLIT_BUCKET_SECONDS, target)
        self._counts[key] = self._counts.get(key, 0) + 1

    async def flush(self, client: "redis.Redis", now: float) -> int:
        """Add the counts to the bucket hashes in Redis and return how many responses they held.

        When Redis fails, the counts are kept for the next flush (except buckets that expired
        meanwhile) and the client's error is raised.
        """
        counts, self._counts = self._counts, {}
        if not counts:
            return 0
        try:
            async with client.pipeline(transaction=False) as pipe:
                for (start, target), count in counts.items():
                    key = gray_split_key(start)
                    pipe.hincrby(key, target, count)
                    pipe.expire(key, GRAY_SPLIT_BUCKET_TTL_SECONDS)
                await pipe.execute()
        except BaseException:
            oldest = now - GRAY_SPLIT_BUCKET_TTL_SECONDS
            for bucket, count in counts.items():
                if bucket[0] >= oldest:
                    self._counts[bucket] = self._counts.get(bucket, 0) + count
            raise
        return sum(counts.values())


async def read_split(client: "redis.Redis", now: float) -> list[dict[str, Any]]:
    """Return the responses per target of the last `SPLIT_BUCKETS` buckets, oldest first.

    Each bucket is `{"start": epoch seconds, "monolith": n, "cqrs": n}`. Counts that a router
    process has not flushed yet (at most one guard check interval) are missing.
    """
    size = GRAY_SPLIT_BUCKET_SECONDS
    current = int(now) // size * size
    starts = [current - size * index for index in range(SPLIT_BUCKETS - 1, -1, -1)]
    async with client.pipeline(transaction=False) as pipe:
        for start in starts:
            pipe.hgetall(gray_split_key(start))
        replies: list[Any] = await pipe.execute()
    buckets: list[dict[str, Any]] = []
    for start, reply in zip(starts, replies, strict=True):
        fields = {_text(key): _text(value) for key, value in (reply or {}).items()}
        bucket: dict[str, Any] = {"start": start}
        for target in TARGETS:
            bucket[target] = int(fields.get(target, 0))
        buckets.append(bucket)
    return buckets


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
