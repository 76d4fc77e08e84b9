"""How far behind the migration's pipelines are: per consumer group, per relay, and reconcile drift.

`read_health` takes a snapshot in two Redis round trips, so the router can call it every second:

- per (stream, group) of `STREAM_GROUPS`: entries delivered but not acknowledged (`pending`),
  entries not yet delivered (`lag_entries`), and the age of the oldest entry the group has not
  acknowledged (`lag_seconds`). A stream entry id starts with the epoch milliseconds of the
  append by the Redis server's clock, so the age is Redis's current time minus that, with no
  bookkeeping of our own.
- per stream: the length of its dead-letter stream.
- per relay: the age of the oldest row not yet relayed, as the relay last reported it.
- the summary of the last reconcile run, when there was one.

A missing stream or group counts as zero. A Redis that cannot be reached raises the client's
error, so the caller decides what an unknown state means.

`HealthCollector` exposes the snapshot as Prometheus gauges. A FastAPI app opts in with
`services.shared.web.install_health_metrics`, which refreshes the snapshot on every scrape of
its `/metrics`.
"""

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from prometheus_client import Counter, Histogram
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector
from redis import exceptions as redis_errors

from .clock import format_epoch, parse_timestamp
from .names import (
    CDC_RELAY_NAME,
    OUTBOX_RELAY_NAME,
    RECONCILE_LAST_KEY,
    RELAY_LAG_KEY,
    STREAM_GROUPS,
    dead_letter_stream,
)
from .streams import REDIS_OUTAGE_ERRORS, parse_entry_id

log = logging.getLogger(__name__)

RELAYS = (CDC_RELAY_NAME, OUTBOX_RELAY_NAME)
# Relays report at least once a second while they run. A report older than this means the relay
# is not running, and every second since the report is added to its lag, because nothing is
# relayed while it is down.
RELAY_REPORT_STALE_SECONDS = 5.0
# Redis before 7, or after an XDEL, reports no lag, so the undelivered entries are counted. The
# count stops here so that one count never blocks Redis for long, and is then a lower bound.
MAX_COUNTED_LAG_ENTRIES = 100_000

# Counts the entries of KEYS[1] after id ARGV[1], in chunks, up to ARGV[2] entries.
_COUNT_AFTER_SCRIPT = """
local count = 0
local start = '(' .. ARGV[1]
local limit = tonumber(ARGV[2])
while count < limit do
  local chunk = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1000)
  count = count + #chunk
  if #chunk < 1000 then break end
  start = '(' .. chunk[#chunk][1]
end
return count
"""


@dataclass(frozen=True)
class GroupHealth:
    stream: str
    group: str
    pending: int  # delivered, not acknowledged
    lag_entries: int  # not yet delivered to the group
    lag_seconds: float  # age of the oldest entry the group has not acknowledged, 0 when none


@dataclass(frozen=True)
class ReconcileSummary:
    """The counts of the last reconcile run (`reconcile:last`)."""

    finished_at: float
    missing: int
    stale: int
    conflicting: int
    drift_entities: int


@dataclass(frozen=True)
class HealthSnapshot:
    taken_at: float  # epoch seconds
    groups: tuple[GroupHealth, ...]  # every (stream, group) of names.STREAM_GROUPS
    dead_letters: dict[str, int]  # stream -> length of its .dlq stream
    relay_lag_seconds: dict[str, float]  # relay name -> age of the oldest unrelayed row
    reconcile: ReconcileSummary | None  # None before the first reconcile run

    @property
    def max_lag_seconds(self) -> float:
        """The largest lag over every group and relay, 0 when all are caught up."""
        lags = [group.lag_seconds for group in self.groups]
        lags.extend(self.relay_lag_seconds.values())
        return max(lags, default=0.0)

    @property
    def dead_letter_total(self) -> int:
        return sum(self.dead_letters.values())

    def to_dict(self) -> dict[str, Any]:
        """Return the snapshot as JSON-ready data for status pages.

        `taken_at` and the reconcile run's `finished_at` become ISO 8601 UTC strings, while lags
        stay numbers of seconds.
        """
        reconcile = None
        if self.reconcile is not None:
            reconcile = self.reconcile.__dict__.copy()
            reconcile["finished_at"] = format_epoch(self.reconcile.finished_at)
        return {
            "taken_at": format_epoch(self.taken_at),
            "max_lag_seconds": self.max_lag_seconds,
            "dead_letter_total": self.dead_letter_total,
            "groups": [group.__dict__.copy() for group in self.groups],
            "dead_letters": dict(self.dead_letters),
            "relay_lag_seconds": dict(self.relay_lag_seconds),
            "reconcile": reconcile,
        }


def entry_age_seconds(entry_id: str, now_ms: int) -> float:
    """Return how long ago, in seconds, the entry with id `entry_id` was appended."""
    return max(now_ms - parse_entry_id(entry_id)[0], 0) / 1000.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decoded(mapping: Mapping[Any, Any]) -> dict[str, Any]:
    return {_text(key): value for key, value in mapping.items()}


async def read_health(client: "redis.Redis") -> HealthSnapshot:
    """Take a snapshot of lag, pending and dead-lettered entries, relay lag and reconcile drift.

    Works with clients that decode replies and with clients that return bytes. Raises the Redis
    client's error when Redis cannot be reached.
    """
    taken_at = time.time()
    streams = list(STREAM_GROUPS)
    async with client.pipeline(transaction=False) as pipe:
        pipe.time()
        for stream in streams:
            pipe.xinfo_groups(stream)
        for stream in streams:
            pipe.xlen(dead_letter_stream(stream))
        pipe.hgetall(RELAY_LAG_KEY)
        pipe.hgetall(RECONCILE_LAST_KEY)
        replies = await pipe.execute(raise_on_error=False)
    _raise_outage(replies)
    server_time, *rest = replies
    now_ms = int(server_time[0]) * 1000 + int(server_time[1]) // 1000
    infos = rest[: len(streams)]
    dead_replies = rest[len(streams) : 2 * len(streams)]
    relay_reply, reconcile_reply = rest[2 * len(streams) :]

    groups_info: dict[tuple[str, str], dict[str, Any]] = {}
    for stream, info in zip(streams, infos, strict=True):
        if isinstance(info, Exception):  # "no such key": the stream does not exist yet
            continue
        for group_info in info:
            decoded = _decoded(group_info)
            groups_info[(stream, _text(decoded["name"]))] = decoded

    groups = await _group_health(client, groups_info, now_ms)
    dead_letters = {
        stream: 0 if isinstance(reply, Exception) else int(reply)
        for stream, reply in zip(streams, dead_replies, strict=True)
    }
    return HealthSnapshot(
        taken_at=taken_at,
        groups=groups,
        dead_letters=dead_letters,
        relay_lag_seconds=parse_relay_lag(_as_mapping(relay_reply), now=taken_at),
        reconcile=parse_reconcile(_as_mapping(reconcile_reply)),
    )


def _raise_outage(replies: Iterable[Any]) -> None:
    for reply in replies:
        if isinstance(reply, (*REDIS_OUTAGE_ERRORS, redis_errors.AuthenticationError)):
            raise reply


def _as_mapping(reply: Any) -> dict[str, str]:
    if isinstance(reply, Exception) or not reply:
        return {}
    return {_text(key): _text(value) for key, value in reply.items()}


async def _group_health(
    client: "redis.Redis", groups_info: dict[tuple[str, str], dict[str, Any]], now_ms: int
) -> tuple[GroupHealth, ...]:
    """Read each existing group's oldest pending and first undelivered entry in one round trip."""
    present = [key for key in _all_groups() if key in groups_info]
    replies: list[Any] = []
    if present:
        async with client.pipeline(transaction=False) as pipe:
            for stream, group in present:
                last_delivered = _text(groups_info[(stream, group)]["last-delivered-id"])
                pipe.xpending(stream, group)
                pipe.xrange(stream, min=f"({last_delivered}", max="+", count=1)
                if groups_info[(stream, group)].get("lag") is None:
                    pipe.eval(
                        _COUNT_AFTER_SCRIPT, 1, stream, last_delivered, MAX_COUNTED_LAG_ENTRIES
                    )
            replies = await pipe.execute(raise_on_error=False)
        _raise_outage(replies)
    results: list[GroupHealth] = []
    position = 0
    for stream, group in _all_groups():
        info = groups_info.get((stream, group))
        if info is None:
            results.append(GroupHealth(stream, group, pending=0, lag_entries=0, lag_seconds=0.0))
            continue
        summary, first_undelivered = replies[position], replies[position + 1]
        position += 2
        lag = info.get("lag")
        if lag is None:
            counted = replies[position]
            position += 1
            lag = 0 if isinstance(counted, Exception) else counted
        pending = 0
        oldest: str | None = None
        if not isinstance(summary, Exception) and summary:
            summary = _decoded(summary)
            pending = int(summary.get("pending") or 0)
            if summary.get("min") is not None:
                oldest = _text(summary["min"])
        if oldest is None and not isinstance(first_undelivered, Exception) and first_undelivered:
            oldest = _text(first_undelivered[0][0])
        results.append(
            GroupHealth(
                stream,
                group,
                pending=pending,
                lag_entries=int(lag),
                lag_seconds=0.0 if oldest is None else entry_age_seconds(oldest, now_ms),
            )
        )
    return tuple(results)


def _all_groups() -> list[tuple[str, str]]:
    return [(stream, group) for stream, groups in STREAM_GROUPS.items() for group in groups]


def parse_relay_lag(fields: Mapping[str, str], *, now: float) -> dict[str, float]:
    """Return each relay's lag from the hash the relays report into; 0 for one never reported.

    A report older than `RELAY_REPORT_STALE_SECONDS` gets the time since the report added to it,
    so a relay that stopped shows a growing lag instead of its last value.
    """
    lags: dict[str, float] = {}
    for relay in RELAYS:
        try:
            reported = float(fields.get(relay, 0.0))
            at = float(fields.get(f"{relay}:at", now))
        except ValueError:
            log.warning(
                "relay lag report unreadable; counted as 0",
                extra={"key": RELAY_LAG_KEY, "relay": relay, "value": fields.get(relay)},
            )
            reported, at = 0.0, now
        silent_for = now - at
        lags[relay] = reported + silent_for if silent_for > RELAY_REPORT_STALE_SECONDS else reported
    return lags


def parse_reconcile(fields: Mapping[str, str]) -> ReconcileSummary | None:
    """Parse `reconcile:last`; None when absent. Unreadable counts are logged and read as 0.

    `drift_entities` falls back to missing + stale + conflicting when it is absent or unreadable,
    so a damaged hash cannot hide drift that its other fields show.
    """
    if not fields:
        return None

    def number(name: str, kind: type[int] | type[float]) -> int | float | None:
        raw = fields.get(name)
        if raw is None:
            return None
        try:
            return kind(float(raw)) if kind is int else kind(raw)
        except ValueError:
            log.warning(
                "reconcile summary field unreadable",
                extra={"key": RECONCILE_LAST_KEY, "field": name, "value": raw[:100]},
            )
            return None

    missing = int(number("missing", int) or 0)
    stale = int(number("stale", int) or 0)
    conflicting = int(number("conflicting", int) or 0)
    drift = number("drift_entities", int)
    return ReconcileSummary(
        finished_at=float(number("finished_at", float) or 0.0),
        missing=missing,
        stale=stale,
        conflicting=conflicting,
        drift_entities=int(drift) if drift is not None else missing + stale + conflicting,
    )


class HealthCollector(Collector):
    """Prometheus gauges of the latest snapshot; `refresh` takes a new one before each scrape.

    One collector is registered per process; every app that opts in refreshes it. When Redis
    cannot be read the gauges are left out of the scrape rather than showing old values.
    """

    def __init__(self) -> None:
        self.snapshot: HealthSnapshot | None = None

    async def refresh(self, client: "redis.Redis") -> None:
        try:
            self.snapshot = await read_health(client)
        except (*REDIS_OUTAGE_ERRORS, redis_errors.RedisError) as error:
            self.snapshot = None
            log.warning("health snapshot failed; lag gauges left out", extra={"error": str(error)})

    def describe(self) -> list[GaugeMetricFamily]:
        # Registering must not call `collect`, which would export a snapshot before the first
        # refresh; names are known without it.
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        snapshot = self.snapshot
        if snapshot is None:
            return []
        labels = ["stream", "group"]
        lag_seconds = GaugeMetricFamily(
            "ztcqrs_stream_lag_seconds",
            "Age of the oldest entry the consumer group has not acknowledged; 0 when caught up.",
            labels=labels,
        )
        pending = GaugeMetricFamily(
            "ztcqrs_stream_pending_entries",
            "Entries delivered to the consumer group and not yet acknowledged.",
            labels=labels,
        )
        lag_entries = GaugeMetricFamily(
            "ztcqrs_stream_lag_entries",
            "Entries not yet delivered to the consumer group.",
            labels=labels,
        )
        for group in snapshot.groups:
            values = [group.stream, group.group]
            lag_seconds.add_metric(values, group.lag_seconds)
            pending.add_metric(values, group.pending)
            lag_entries.add_metric(values, group.lag_entries)
        dead = GaugeMetricFamily(
            "ztcqrs_dead_letter_entries",
            "Entries in the stream's dead-letter stream.",
            labels=["stream"],
        )
        for stream, count in snapshot.dead_letters.items():
            dead.add_metric([stream], count)
        relays = GaugeMetricFamily(
            "ztcqrs_relay_lag_seconds",
            "Age of the oldest row the relay has not yet appended to its stream.",
            labels=["relay"],
        )
        for relay, lag in snapshot.relay_lag_seconds.items():
            relays.add_metric([relay], lag)
        families = [lag_seconds, pending, lag_entries, dead, relays]
        if snapshot.reconcile is not None:
            drift = GaugeMetricFamily(
                "ztcqrs_reconcile_drift_entities",
                "Entities that differed between the two sides in the last reconcile run.",
                labels=["problem"],
            )
            drift.add_metric(["missing"], snapshot.reconcile.missing)
            drift.add_metric(["stale"], snapshot.reconcile.stale)
            drift.add_metric(["conflicting"], snapshot.reconcile.conflicting)
            families.append(drift)
            families.append(
                GaugeMetricFamily(
                    "ztcqrs_reconcile_finished_timestamp_seconds",
                    "When the last reconcile run finished, in epoch seconds.",
                    value=snapshot.reconcile.finished_at,
                )
            )
        return families


_collector: HealthCollector | None = None


def health_collector() -> HealthCollector:
    """Return the process's collector, registering it on first use."""
    global _collector
    if _collector is None:
        _collector = HealthCollector()
        REGISTRY.register(_collector)
    return _collector


# Same version, other content, seen where each side applies incoming states. `side` is
# `monolith` (sync API), `cqrs-write` (CDC ingest) or `cqrs-read` (projector); `resolution` is
# the Decision value, conflict_apply or conflict_keep. A redelivered conflicting event counts again.
SYNC_CONFLICTS = Counter(
    "ztcqrs_sync_conflicts_total",
    "States received with the stored version but other content, by receiving side and resolution.",
    ["side", "resolution"],
)


# Relay side: what the CDC and outbox relays observe and report while they run.

RELAY_PUBLISH_LAG = Histogram(
    "ztcqrs_relay_publish_lag_seconds",
    "Time from a row's commit to the change log or outbox until the relay appended it to its "
    "stream.",
    ["relay"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)
RELAY_REPORT_INTERVAL_SECONDS = 1.0


def observe_publish_lag(relay: str, committed_at: Iterable[str], *, now: float) -> None:
    """Observe, for each row relayed at `now`, the time since its commit timestamp.

    Runs between the append and the checkpoint, so it never raises: a timestamp in another format
    is left out of the histogram.
    """
    histogram = RELAY_PUBLISH_LAG.labels(relay)
    for text in committed_at:
        try:
            committed = parse_timestamp(text).timestamp()
        except (TypeError, ValueError):
            log.debug("commit time not parsed", extra={"relay": relay, "value": str(text)[:64]})
            continue
        histogram.observe(max(now - committed, 0.0))


def age_seconds(committed_at: str | None, *, now: float) -> float:
    """Age of the oldest unrelayed row from its commit timestamp; 0 when there is none."""
    if committed_at is None:
        return 0.0
    return max(now - parse_timestamp(committed_at).timestamp(), 0.0)


class RelayLagReporter:
    """Reports a relay's lag into `RELAY_LAG_KEY`, at most once per interval.

    `oldest_unrelayed` returns the commit timestamp of the oldest row after the checkpoint, or
    None when the relay is caught up. A failed report is logged and tried again at the next
    interval, because the lag report must never stop the relaying.
    """

    def __init__(
        self,
        client: "redis.Redis",
        relay: str,
        oldest_unrelayed: Callable[[], Awaitable[str | None]],
        *,
        interval_seconds: float = RELAY_REPORT_INTERVAL_SECONDS,
    ) -> None:
        self.client = client
        self.relay = relay
        self.oldest_unrelayed = oldest_unrelayed
        self.interval_seconds = interval_seconds
        self._next_report = 0.0

    async def maybe_report(self) -> float | None:
        """Report when the interval has passed; return the reported lag, None when skipped."""
        if time.monotonic() < self._next_report:
            return None
        self._next_report = time.monotonic() + self.interval_seconds
        try:
            oldest = await self.oldest_unrelayed()
            now = time.time()
            lag = age_seconds(oldest, now=now)
            await self.client.hset(
                RELAY_LAG_KEY, mapping={self.relay: f"{lag:.3f}", f"{self.relay}:at": f"{now:.3f}"}
            )
        except Exception as error:
            log.warning(
                "relay lag report failed; trying again next interval",
                extra={"relay": self.relay, "key": RELAY_LAG_KEY, "error": repr(error)},
            )
            return None
        return lag
