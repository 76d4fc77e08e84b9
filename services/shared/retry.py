"""Backoff and interruptible sleeps for loops that retry a failing dependency."""

import asyncio
import contextlib
import random


def backoff_seconds(attempt: int, *, base: float = 0.2, maximum: float = 10.0) -> float:
    """Return a jittered exponential delay for retry number `attempt` (1 for the first retry).

    The delay is drawn from the upper half of `base * 2 ** (attempt - 1)`, capped at `maximum`, so
    processes that failed together do not retry together.
    """
    ceiling = min(maximum, base * 2 ** max(attempt - 1, 0))
    return random.uniform(ceiling / 2, ceiling)


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Sleep for `seconds`, returning early when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
