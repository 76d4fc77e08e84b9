"""Read-your-writes across the split: the `X-Consistency-Token` header that both services share.

Every order write, on the monolith or on the CQRS service, returns `X-Consistency-Token: <order
id>@<version>`. A read that sends it back waits, up to a bound set per service, until the side
that serves it stores that order at that version or later. Replication between the sides is
asynchronous, so without the token a user sent to the other side right after a write could read
an older state, or get 404 for an order just created.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

CONSISTENCY_HEADER = "X-Consistency-Token"
# Pause between two version checks while a read waits; a check is one primary-key lookup.
VERSION_POLL_SECONDS = 0.02


@dataclass(frozen=True)
class ConsistencyToken:
    order_id: str
    version: int

    def __str__(self) -> str:
        return f"{self.order_id}@{self.version}"


def parse_consistency_token(value: str | None) -> ConsistencyToken | None:
    """Parse `<order id>@<version>`; return None for a missing or malformed value.

    A malformed token is ignored rather than rejected, so the same request gets the same status
    code from either side, and a client never fails on a token it copied wrongly.
    """
    if not value:
        return None
    order_id, _, version = value.strip().rpartition("@")
    if not order_id or not version.isdigit():
        log.warning("ignoring malformed consistency token", extra={"token": value[:200]})
        return None
    return ConsistencyToken(order_id, int(version))


async def wait_for_version(
    load_version: Callable[[], Awaitable[int | None]],
    version: int,
    timeout_seconds: float,
    *,
    poll_seconds: float = VERSION_POLL_SECONDS,
) -> bool:
    """Call `load_version` until it returns `version` or later; return False once the bound passes.

    `load_version` returns None while the order does not exist. It is called at least once, so a
    bound of 0 still checks the current state.
    """
    deadline = time.monotonic() + timeout_seconds
    while True:
        stored = await load_version()
        if stored is not None and stored >= version:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(poll_seconds, remaining))
