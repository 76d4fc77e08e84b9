"""Per-user gate: a user moves to the CQRS side only once it contains all of that user's changes.

With `gate.enabled` in the rules, a request that a rule sends to `cqrs` for a verified subject goes
there only once `services.shared.user_gate.is_replicated` returned True for the subject; until
then it goes to the monolith, keeps its X-Gray-Rule, and counts as held. A user who is moved
before CDC ingest and the projector applied their last monolith change would otherwise read an
older state, or get 404 for an order just created on the monolith.

The request path never waits on Redis:

- A subject found replicated once stays allowed, in a bounded LRU of allowed subjects.
- Any other subject is held, and a background task checks it, at most once per
  `recheck_seconds` per subject and at most `max_checks` at a time across subjects.
- A Redis error holds the subject, logs at most once per `LOG_INTERVAL_SECONDS`, and the next
  request after `recheck_seconds` checks again.

NOTE: an allowed subject is not checked again. A user who writes on the monolith after being
allowed (through a rule that sends some routes there, or while the guard diverts traffic) can read
that write on the CQRS side before it is replicated; the consistency token covers the write itself.
"""

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.shared.user_gate import is_replicated

from .routes import CQRS, MONOLITH, upstream_route
from .rules import Decision

log = logging.getLogger(__name__)

GATE_HELD = Counter(
    "ztcqrs_router_gate_held_total",
    "Requests a rule sent to cqrs that went to the monolith because the user's changes were "
    "not yet replicated to the CQRS side, by rule.",
    ["rule"],
)

# Minimum seconds between two log lines about failed gate checks; the lines in between are
# counted in the next one.
LOG_INTERVAL_SECONDS = 10.0


class LogThrottle:
    """Let through at most one log line per `interval_seconds`, and count the rest."""

    def __init__(self, interval_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def allow(self) -> int | None:
        """Return the number of lines suppressed since the last one let through, or None to skip."""
        now = self._clock()
        if self._last is not None and now - self._last < self.interval_seconds:
            self._suppressed += 1
            return None
        self._last = now
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


class UserGate:
    """In-process cache of which users may move to the CQRS side, refreshed in the background."""

    def __init__(
        self,
        redis: Redis,
        *,
        max_allowed: int = 100_000,
        max_waiting: int = 100_000,
        recheck_seconds: float = 1.0,
        max_checks: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.max_allowed = max_allowed
        self.max_waiting = max_waiting
        self.recheck_seconds = recheck_seconds
        self.max_checks = max_checks
        self._clock = clock
        # Subjects found replicated, least recently used first.
        self._allowed: OrderedDict[str, None] = OrderedDict()
        # Subjects not found replicated yet, with the monotonic time of their last check.
        self._waiting: OrderedDict[str, float] = OrderedDict()
        self._checking: dict[str, asyncio.Task[None]] = {}
        self._errors = LogThrottle(LOG_INTERVAL_SECONDS, clock)
        self.held = 0
        self.check_failures = 0

    def admit(self, decision: Decision, subject: str | None, method: str, path: str) -> Decision:
        """Return `decision`, or a monolith decision under the same rule while the user is held.

        Only requests that would reach the CQRS service are gated: a decision for `cqrs` on a route
        the CQRS service does not serve goes to the monolith anyway, and is not counted.
        """
        if decision.target != CQRS or not subject:
            return decision
        if subject in self._allowed:
            self._allowed.move_to_end(subject)
            return decision
        if upstream_route(CQRS, method, path)[0] != CQRS:
            return decision
        self._check_soon(subject)
        self.held += 1
        GATE_HELD.labels(decision.rule_name).inc()
        return Decision(decision.rule_name, MONOLITH, None)

    def status(self) -> dict[str, Any]:
        return {
            "held": self.held,
            "users_waiting": len(self._waiting),
            "users_allowed": len(self._allowed),
            "checks_in_flight": len(self._checking),
            "check_failures": self.check_failures,
        }

    async def close(self) -> None:
        """Cancel the checks in flight; the caller closes the Redis client."""
        tasks = list(self._checking.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _check_soon(self, subject: str) -> None:
        if subject in self._checking or len(self._checking) >= self.max_checks:
            return
        last = self._waiting.get(subject)
        if last is not None and self._clock() - last < self.recheck_seconds:
            return
        self._mark_checked(subject)
        task = asyncio.get_running_loop().create_task(self._check(subject))
        self._checking[subject] = task

    async def _check(self, subject: str) -> None:
        try:
            replicated = await is_replicated(self.redis, subject)
        except (RedisError, OSError) as error:
            self.check_failures += 1
            suppressed = self._errors.allow()
            if suppressed is not None:
                log.warning(
                    "user gate check failed; holding the user on the monolith",
                    extra={"subject": subject, "error": repr(error),
                           "suppressed_since_last": suppressed},
                )
            return
        finally:
            self._checking.pop(subject, None)
        if replicated:
            self._waiting.pop(subject, None)
            self._allowed[subject] = None
            if len(self._allowed) > self.max_allowed:
                self._allowed.popitem(last=False)

    def _mark_checked(self, subject: str) -> None:
        self._waiting[subject] = self._clock()
        self._waiting.move_to_end(subject)
        if len(self._waiting) > self.max_waiting:
            self._waiting.popitem(last=False)
