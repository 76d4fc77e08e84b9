"""Throttling of failed sign-ins, per account and per client address.

Failures are counted in fixed windows in Redis, so every auth replica sees the same counts. While
Redis is unreachable the counts fall back to this process's memory, which keeps the limit per
replica instead of dropping it. A throttled attempt is rejected before its password is hashed.
"""

import hashlib
import logging
import math
import time
from collections.abc import Callable

import redis.asyncio as redis
from redis import exceptions as redis_errors

from services.shared.names import LOGIN_FAILURES_PREFIX

log = logging.getLogger(__name__)

KEY_PREFIX = LOGIN_FAILURES_PREFIX


def account_key(kind: str, name: str) -> str:
    # Hashed, so that any username is a short key and none appears in Redis in clear.
    return f"{KEY_PREFIX}:{kind}:{hashlib.sha256(name.encode()).hexdigest()[:32]}"


def address_key(address: str) -> str:
    return f"{KEY_PREFIX}:address:{address}"


class LoginThrottle:
    """Failed attempts per key in windows of `window_seconds`, with a limit for each key."""

    def __init__(
        self,
        client: "redis.Redis | None",
        *,
        window_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.window_seconds = window_seconds
        self.clock = clock
        # Key: (window end on `clock`, failures), used while Redis is unreachable.
        self._local: dict[str, tuple[float, int]] = {}
        self._redis_failed = False

    async def retry_after(self, limits: dict[str, int]) -> int | None:
        """Return None when every key is under its limit, or the seconds until all are."""
        counts = await self._counts(list(limits))
        waits = [
            remaining
            for key, (failures, remaining) in counts.items()
            if failures >= limits[key]
        ]
        return max(1, math.ceil(max(waits))) if waits else None

    async def record_failure(self, keys: list[str]) -> None:
        window_ms = int(self.window_seconds * 1000)
        if self.client is not None:
            try:
                async with self.client.pipeline(transaction=True) as pipe:
                    for key in keys:
                        # SET NX EX starts the window at the first failure; INCR counts.
                        pipe.set(key, 0, px=window_ms, nx=True)
                        pipe.incr(key)
                    await pipe.execute()
                self._recovered()
                return
            except redis_errors.RedisError as error:
                self._fell_back(error)
        now = self.clock()
        for key in keys:
            ends_at, failures = self._local.get(key, (now + self.window_seconds, 0))
            if ends_at <= now:
                ends_at, failures = now + self.window_seconds, 0
            self._local[key] = (ends_at, failures + 1)
        self._forget_ended(now)

    async def _counts(self, keys: list[str]) -> dict[str, tuple[int, float]]:
        """Return each key's failures and the seconds left in its window."""
        if self.client is not None:
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.get(key)
                        pipe.pttl(key)
                    replies = await pipe.execute()
                self._recovered()
                return {
                    key: (int(replies[2 * index] or 0), max(replies[2 * index + 1], 0) / 1000)
                    for index, key in enumerate(keys)
                }
            except redis_errors.RedisError as error:
                self._fell_back(error)
        now = self.clock()
        counts: dict[str, tuple[int, float]] = {}
        for key in keys:
            ends_at, failures = self._local.get(key, (now, 0))
            counts[key] = (failures, ends_at - now) if ends_at > now else (0, 0.0)
        return counts

    def _forget_ended(self, now: float) -> None:
        if len(self._local) > 10_000:
            self._local = {key: value for key, value in self._local.items() if value[0] > now}

    def _fell_back(self, error: Exception) -> None:
        if not self._redis_failed:
            self._redis_failed = True
            log.warning(
                "login throttle cannot reach Redis; counting failures in this process only",
                extra={"error": str(error)},
            )

    def _recovered(self) -> None:
        if self._redis_failed:
            self._redis_failed = False
            log.info("login throttle reaches Redis again")
