"""The router's guard: send CQRS traffic back to the monolith when the migration is unhealthy.

Each router process runs one background loop. Every `guard.check_interval_seconds` it flushes the
split counters to Redis, reads the migration health (`read_health`) and the shared trip
(`names.GRAY_GUARD_KEY`), and checks the thresholds of the rules file's `guard` section:

- `drift_entities`: the last reconcile run's drift. A run that finished before `reset_at` is
  ignored, because it was seen before the reset and cannot change until the next run.
- `lag_seconds`: `HealthSnapshot.max_lag_seconds`, measured live.
- `dead_letters`: `HealthSnapshot.dead_letter_total`, measured live, so the dead letters must be
  replayed or deleted (`ztcqrs dlq`) before a reset sticks.
- `cqrs_error_rate`: the share of calls to the CQRS service in the last `error_window_seconds`
  that failed or returned 5xx, once there were `min_requests` calls. This process's calls only,
  and only those after `reset_at`.

Crossing one writes the trip hash unless another process already has, so every process and
replica diverts within one interval. A trip is cleared when the rules file's `reset_at` is later
than its `tripped_at`; `ztcqrs rollout unfreeze` sets it.

When Redis cannot be read, the loop keeps the last state and logs the first failure and every
tenth. The guard fails safe: once the health has been unreadable for
`ROUTER_GUARD_FAIL_SAFE_SECONDS` while the rules set a threshold, the process diverts on its own
(threshold `health_unreadable`), because the migration can no longer be shown to be healthy. CDC
and the reverse sync keep every user's data on the monolith during the migration, so the monolith
can serve any user.

Per request the guard costs a few attribute reads and a counter update; it never waits on Redis.
"""

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from prometheus_client import Counter, Gauge
from redis import exceptions as redis_errors

from services.shared.clock import format_epoch
from services.shared.migration_health import HealthSnapshot, read_health
from services.shared.names import GRAY_GUARD_KEY, GRAY_SPLIT_BUCKET_SECONDS
from services.shared.retry import sleep_unless_stopped
from services.shared.streams import connect

from .routes import CQRS, MONOLITH
from .rules import Decision, GuardConfig, GuardThresholds
from .traffic import ErrorWindow, SplitCounter, read_split

log = logging.getLogger(__name__)

GUARD_TRIPS = Counter(
    "ztcqrs_router_guard_trips_total",
    "Trips of the guard written by this process, by the threshold that was crossed.",
    ["threshold"],
)
GUARD_TRIPPED = Gauge(
    "ztcqrs_router_guard_tripped",
    "1 while this router (any of its processes) sends requests meant for cqrs to the monolith "
    "because the guard is tripped (by any router, or by unreadable health), else 0. A manual "
    "freeze is not counted.",
    multiprocess_mode="livemax",
)

# X-Gray-Rule of requests the guard diverted.
GUARD_RULE = "guard"
# Threshold name of the local trip when the health cannot be read.
HEALTH_UNREADABLE = "health_unreadable"
# Maximum wait for the status page's read of the split from Redis, in seconds.
STATUS_READ_TIMEOUT_SECONDS = 2.0

# Writes the trip only when no process has tripped already, so the first trip's reason stays.
_TRIP_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
# Deletes the trip only when it is still the one that the reset covers, so a newer trip stays.
_CLEAR_SCRIPT = """
if redis.call('HGET', KEYS[1], 'tripped_at') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Trip:
    """A crossed threshold: which one, the value measured, its limit, when and by which router."""

    threshold: str
    value: float
    limit: float
    tripped_at: float
    router: str

    def to_fields(self) -> dict[str, str]:
        return {
            "threshold": self.threshold,
            "value": repr(self.value),
            "limit": repr(self.limit),
            "tripped_at": repr(self.tripped_at),
            "router": self.router,
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "Trip":
        """Parse the trip hash. Unreadable numbers become 0, so a damaged hash still diverts."""

        def number(name: str) -> float:
            try:
                return float(fields.get(name, "0"))
            except ValueError:
                return 0.0

        return cls(
            threshold=fields.get("threshold", "unknown"),
            value=number("value"),
            limit=number("limit"),
            tripped_at=number("tripped_at"),
            router=fields.get("router", "unknown"),
        )


def router_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def first_crossing(
    thresholds: GuardThresholds,
    snapshot: HealthSnapshot,
    errors: tuple[int, int],
    reset_at: float | None,
) -> tuple[str, float, float] | None:
    """Return (threshold, value, limit) of the first threshold crossed, or None.

    `errors` is (calls, failed calls) to the CQRS service in the error window.
    """
    reconcile = snapshot.reconcile
    if (
        thresholds.drift_entities is not None
        and reconcile is not None
        and (reset_at is None or reconcile.finished_at > reset_at)
        and reconcile.drift_entities > thresholds.drift_entities
    ):
        return "drift_entities", reconcile.drift_entities, thresholds.drift_entities
    lag = snapshot.max_lag_seconds
    if thresholds.lag_seconds is not None and lag > thresholds.lag_seconds:
        return "lag_seconds", lag, thresholds.lag_seconds
    dead = snapshot.dead_letter_total
    if thresholds.dead_letters is not None and dead > thresholds.dead_letters:
        return "dead_letters", dead, thresholds.dead_letters
    calls, failures = errors
    if thresholds.cqrs_error_rate is not None and calls >= thresholds.min_requests:
        rate = failures / calls
        if rate > thresholds.cqrs_error_rate:
            return "cqrs_error_rate", rate, thresholds.cqrs_error_rate
    return None


class Guard:
    """The guard of one router process: its background loop, its state and its counters."""

    def __init__(
        self,
        redis_url: str,
        config: Callable[[], GuardConfig],
        *,
        fail_safe_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis_url = redis_url
        self.fail_safe_seconds = fail_safe_seconds
        self._config = config
        self._clock = clock
        self._router = router_id()
        self.errors = ErrorWindow()
        self.split = SplitCounter()
        # Read on every request, so it is one attribute that the loop sets.
        self.diverting = False
        self.trip: Trip | None = None
        self.snapshot: HealthSnapshot | None = None
        self.checked_at: float | None = None
        self.last_error: str | None = None
        self._unreadable_since: float | None = None
        self._failures = 0
        self._client: redis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    # Per request

    def route(self, decision: Decision, config: GuardConfig) -> Decision:
        """Return `decision`, or the monolith under rule `guard` when it goes to a diverted cqrs."""
        if decision.target != CQRS or not (self.diverting or config.frozen):
            return decision
        return Decision(GUARD_RULE, MONOLITH, None)

    def count_response(self, target: str) -> None:
        self.split.count(self._clock(), target)

    def count_cqrs_call(self, *, failed: bool) -> None:
        self.errors.count(int(self._clock()), failed=failed)

    # Lifespan

    def start(self) -> None:
        if self._task is None:
            self._client = connect(self.redis_url)
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="router-guard")
            log.info(
                "guard started",
                extra={"router": self._router, "fail_safe_seconds": self.fail_safe_seconds},
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stop.set()
            done, _ = await asyncio.wait({task}, timeout=5)
            if not done:
                log.warning("guard loop did not stop in time; cancelling it")
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
            log.info("guard stopped", extra={"router": self._router})

    async def _run(self) -> None:
        while not self._stop.is_set():
            config = self._config()
            try:
                await self.check_once(config)
            except Exception:
                # The loop must survive any bug in one check, because it is the only thing
                # that can clear or raise the diversion.
                log.exception("guard check crashed; keeping the last state")
            await sleep_unless_stopped(self._stop, config.check_interval_seconds)

    # One check

    async def check_once(self, config: GuardConfig) -> None:
        """Flush the split, read the health and the shared trip, and trip or clear as needed."""
        if self._client is None:
            self._client = connect(self.redis_url)
        now = self._clock()
        try:
            await self.split.flush(self._client, now)
            snapshot = await read_health(self._client)
            trip = await self._current_trip(config)
            if trip is None and config.thresholds.any_set:
                window = config.thresholds.error_window_seconds
                errors = self.errors.totals(int(now), window, since=config.reset_at)
                crossing = first_crossing(config.thresholds, snapshot, errors, config.reset_at)
                if crossing is not None:
                    trip = await self._trip(*crossing, now=now)
        except (redis_errors.RedisError, OSError) as error:
            self._record_failure(error, now)
        else:
            self._record_success(snapshot, now)
            self._set_trip(trip)
        self._update_diversion(config, now)

    async def _current_trip(self, config: GuardConfig) -> Trip | None:
        assert self._client is not None
        raw: dict[Any, Any] = await self._client.hgetall(GRAY_GUARD_KEY)
        if not raw:
            return None
        fields = {_text(key): _text(value) for key, value in raw.items()}
        trip = Trip.from_fields(fields)
        if config.reset_at is not None and config.reset_at > trip.tripped_at:
            cleared = await self._client.eval(
                _CLEAR_SCRIPT, 1, GRAY_GUARD_KEY, fields.get("tripped_at", "")
            )
            if cleared:
                log.info(
                    "guard trip cleared by reset_at",
                    extra={
                        "threshold": trip.threshold, "tripped_at": trip.tripped_at,
                        "reset_at": config.reset_at, "router": self._router,
                    },
                )
            return None
        return trip

    async def _trip(self, threshold: str, value: float, limit: float, *, now: float) -> Trip:
        assert self._client is not None
        trip = Trip(threshold, float(value), float(limit), now, self._router)
        arguments = [item for pair in trip.to_fields().items() for item in pair]
        written = await self._client.eval(
            _TRIP_SCRIPT, 1, GRAY_GUARD_KEY, *arguments
        )
        if not written:
            # Another process tripped first, and its reason is kept.
            return await self._current_trip(self._config()) or trip
        GUARD_TRIPS.labels(threshold).inc()
        log.warning(
            "guard tripped; requests for cqrs go to the monolith",
            extra={
                "threshold": threshold, "value": trip.value, "limit": trip.limit,
                "router": self._router,
            },
        )
        return trip

    def _set_trip(self, trip: Trip | None) -> None:
        previous, self.trip = self.trip, trip
        if trip is not None and (previous is None or previous.tripped_at != trip.tripped_at):
            if trip.router != self._router:
                log.warning(
                    "guard tripped by another router; requests for cqrs go to the monolith",
                    extra={
                        "threshold": trip.threshold, "value": trip.value, "limit": trip.limit,
                        "tripped_by": trip.router, "router": self._router,
                    },
                )
        elif trip is None and previous is not None:
            log.info(
                "guard no longer tripped; requests for cqrs go to cqrs again",
                extra={"threshold": previous.threshold, "router": self._router},
            )

    def _record_success(self, snapshot: HealthSnapshot, now: float) -> None:
        if self._failures:
            log.info(
                "guard reads Redis again",
                extra={"failures": self._failures, "router": self._router},
            )
        self._failures = 0
        self._unreadable_since = None
        self.last_error = None
        self.snapshot = snapshot
        self.checked_at = now

    def _record_failure(self, error: Exception, now: float) -> None:
        self._failures += 1
        if self._unreadable_since is None:
            self._unreadable_since = now
        self.last_error = f"{type(error).__name__}: {error}"
        # One line when the outage starts and then every tenth failure, not one per check.
        if self._failures == 1 or self._failures % 10 == 0:
            log.warning(
                "guard cannot read the migration health from Redis; keeping the last state",
                extra={
                    "error": self.last_error, "failures": self._failures,
                    "unreadable_for_s": round(now - self._unreadable_since, 1),
                    "router": self._router,
                },
            )

    def _update_diversion(self, config: GuardConfig, now: float) -> None:
        failing_safe = self.failing_safe(config, now)
        diverting = self.trip is not None or failing_safe
        if failing_safe and not self.diverting:
            log.error(
                "guard fails safe: the migration health has been unreadable for too long; "
                "requests for cqrs go to the monolith",
                extra={
                    "threshold": HEALTH_UNREADABLE, "error": self.last_error,
                    "limit_s": self.fail_safe_seconds, "router": self._router,
                },
            )
        self.diverting = diverting
        GUARD_TRIPPED.set(1 if diverting else 0)

    def failing_safe(self, config: GuardConfig, now: float) -> bool:
        """Return True when the health has been unreadable for too long under active thresholds."""
        return (
            self.fail_safe_seconds > 0
            and config.thresholds.any_set
            and self._unreadable_since is not None
            and now - self._unreadable_since >= self.fail_safe_seconds
        )

    # Status

    def status(self, config: GuardConfig) -> dict[str, Any]:
        """Return the `guard` section of the router's status, with times as ISO 8601 UTC."""
        now = self._clock()
        trip = self.trip
        tripped_at: float | None = None
        body: dict[str, Any] = {
            "frozen": config.frozen,
            "tripped": self.diverting,
            "threshold": None, "value": None, "limit": None, "tripped_at": None,
            "tripped_by": None,
            "reset_at": _iso_time(config.reset_at),
            "thresholds": config.thresholds.__dict__.copy(),
            "checked_at": _iso_time(self.checked_at),
            "error": self.last_error,
        }
        if trip is not None:
            tripped_at = trip.tripped_at
            body.update(
                threshold=trip.threshold, value=trip.value, limit=trip.limit,
                tripped_by=trip.router,
            )
        elif self.failing_safe(config, now) and self._unreadable_since is not None:
            since = self._unreadable_since
            tripped_at = since + self.fail_safe_seconds
            body.update(
                threshold=HEALTH_UNREADABLE, value=round(now - since, 1),
                limit=self.fail_safe_seconds, tripped_by=self._router,
            )
        body["tripped_at"] = _iso_time(tripped_at)
        return body

    def health_status(self) -> dict[str, Any] | None:
        """Return the `health` section: the last snapshot the loop read, or None before one."""
        return None if self.snapshot is None else self.snapshot.to_dict()

    async def split_status(self) -> dict[str, Any]:
        """Return the `split` section: responses per target per bucket over the last 10 minutes.

        Each bucket's `start` is ISO 8601 UTC, while the Redis keys keep epoch seconds.
        """
        body: dict[str, Any] = {"bucket_seconds": GRAY_SPLIT_BUCKET_SECONDS, "buckets": []}
        if self._client is None:
            body["error"] = "The guard is not running, so the split is not read from Redis."
            return body
        try:
            async with asyncio.timeout(STATUS_READ_TIMEOUT_SECONDS):
                buckets = await read_split(self._client, self._clock())
        except (redis_errors.RedisError, OSError, TimeoutError) as error:
            log.warning("split read for the status failed", extra={"error": str(error)})
            body["error"] = f"The split could not be read from Redis: {error}"
            return body
        body["buckets"] = [{**bucket, "start": _iso_time(bucket["start"])} for bucket in buckets]
        return body


def _iso_time(epoch: float | None) -> str | None:
    """Format epoch seconds as ISO 8601 UTC, the format of `loaded_at` and every status time."""
    return None if epoch is None else format_epoch(epoch)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
