"""Pieces the CQRS workers share: consumer options from settings and an interruptible sleep."""

import asyncio
import contextlib
import random

from services.shared.streams import ConsumerOptions

from ..settings import Settings

RETRY_BASE_SECONDS = 0.2
RETRY_MAX_SECONDS = 10.0


def consumer_options(settings: Settings) -> ConsumerOptions:
    return ConsumerOptions(max_tries=settings.max_tries, claim_idle_ms=settings.claim_idle_ms)


def backoff_seconds(attempt: int) -> float:
    """Return a jittered exponential delay for retry number `attempt` (1 for the first retry)."""
    ceiling = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** max(attempt - 1, 0))
    return random.uniform(ceiling / 2, ceiling)


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Sleep for `seconds`, returning early when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
