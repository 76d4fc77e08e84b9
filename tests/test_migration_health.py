"""Migration health: lag, pending and dead-lettered entries, relay lag and reconcile drift."""

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY

from services.cqrs.schema import open_write_model
from services.cqrs.write_model import apply_event
from services.shared.consistency import Decision
from services.shared.migration_health import (
    RELAY_REPORT_STALE_SECONDS,
    GroupHealth,
    HealthSnapshot,
    ReconcileSummary,
    read_health,
)
from services.shared.names import (
    CDC_RELAY_NAME,
    CDC_STREAM,
    CQRS_STREAM,
    INGEST_GROUP,
    OUTBOX_RELAY_NAME,
    PROJECTOR_GROUP,
    RECONCILE_LAST_KEY,
    RELAY_LAG_KEY,
    REVERSE_SYNC_GROUP,
    STREAM_GROUPS,
    dead_letter_stream,
)
from services.shared.streams import connect, ensure_group
from tests.conftest import SigningKey
from tests.cqrs_support import api_client, cqrs_settings, order_event


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator["redis.Redis"]:
    client = connect(redis_url)
    yield client
    await client.aclose()


def group(snapshot: HealthSnapshot, stream: str, name: str) -> GroupHealth:
    return next(g for g in snapshot.groups if (g.stream, g.group) == (stream, name))


def event_fields() -> dict[str, str]:
    state = {"id": "o-1", "user_id": "alice", "status": "pending", "version": 1}
    return order_event(state, action="created", origin="monolith").to_fields()


async def append_at(client: "redis.Redis", stream: str, seconds_ago: float) -> str:
    """Append an entry with an id dated `seconds_ago` by Redis's clock; return the id."""
    seconds, microseconds = await client.time()
    now_ms = int(seconds) * 1000 + int(microseconds) // 1000
    entry_id = f"{now_ms - int(seconds_ago * 1000)}-0"
    return str(await client.xadd(stream, event_fields(), id=entry_id))  # type: ignore[arg-type]


async def test_missing_streams_and_groups_are_zero(client: "redis.Redis") -> None:
    snapshot = await read_health(client)

    expected = {(s, g) for s, groups in STREAM_GROUPS.items() for g in groups}
    assert {(g.stream, g.group) for g in snapshot.groups} == expected
    assert all(
        (g.pending, g.lag_entries, g.lag_seconds) == (0, 0, 0.0) for g in snapshot.groups
    )
    assert snapshot.dead_letters == {CDC_STREAM: 0, CQRS_STREAM: 0}
    assert snapshot.relay_lag_seconds == {CDC_RELAY_NAME: 0.0, OUTBOX_RELAY_NAME: 0.0}
    assert snapshot.reconcile is None
    assert snapshot.max_lag_seconds == 0.0
    assert snapshot.dead_letter_total == 0


async def test_lag_until_entry_acknowledged(
    client: "redis.Redis",
) -> None:
    for name in STREAM_GROUPS[CDC_STREAM]:
        await ensure_group(client, CDC_STREAM, name)
    entry_id = await append_at(client, CDC_STREAM, seconds_ago=5)

    first = await read_health(client)
    ingest = group(first, CDC_STREAM, INGEST_GROUP)
    assert (ingest.pending, ingest.lag_entries) == (0, 1)
    assert ingest.lag_seconds >= 5.0
    assert first.max_lag_seconds >= 5.0

    # Delivered but not acknowledged: still lagging, now as pending.
    await client.xreadgroup(INGEST_GROUP, "c1", {CDC_STREAM: ">"})
    second = await read_health(client)
    ingest = group(second, CDC_STREAM, INGEST_GROUP)
    assert (ingest.pending, ingest.lag_entries) == (1, 0)
    assert ingest.lag_seconds >= group(first, CDC_STREAM, INGEST_GROUP).lag_seconds

    await client.xack(CDC_STREAM, INGEST_GROUP, entry_id)
    third = await read_health(client)
    ingest = group(third, CDC_STREAM, INGEST_GROUP)
    assert (ingest.pending, ingest.lag_entries, ingest.lag_seconds) == (0, 0, 0.0)
    # The projector group has not read the entry, so it still lags; the other stream does not.
    projector = group(third, CDC_STREAM, PROJECTOR_GROUP)
    assert projector.lag_entries == 1
    assert projector.lag_seconds >= 5.0
    assert group(third, CQRS_STREAM, REVERSE_SYNC_GROUP).lag_seconds == 0.0


async def test_oldest_pending_entry_sets_the_lag(client: "redis.Redis") -> None:
    await ensure_group(client, CQRS_STREAM, REVERSE_SYNC_GROUP)
    oldest = await append_at(client, CQRS_STREAM, seconds_ago=60)
    await append_at(client, CQRS_STREAM, seconds_ago=2)
    await client.xreadgroup(REVERSE_SYNC_GROUP, "c1", {CQRS_STREAM: ">"}, count=2)
    await client.xack(CQRS_STREAM, REVERSE_SYNC_GROUP, oldest)
    await append_at(client, CQRS_STREAM, seconds_ago=1)

    health = group(await read_health(client), CQRS_STREAM, REVERSE_SYNC_GROUP)

    assert (health.pending, health.lag_entries) == (1, 1)
    assert 2.0 <= health.lag_seconds < 60.0


async def test_lag_entries_are_counted_when_redis_cannot_tell(client: "redis.Redis") -> None:
    await ensure_group(client, CDC_STREAM, INGEST_GROUP)
    ids = [await append_at(client, CDC_STREAM, seconds_ago=10 - n) for n in range(4)]
    await client.xreadgroup(INGEST_GROUP, "c1", {CDC_STREAM: ">"}, count=1)
    await client.xack(CDC_STREAM, INGEST_GROUP, ids[0])
    # Redis 7 reports no lag after an entry in the middle is deleted; Redis 6.2 never does.
    await client.xdel(CDC_STREAM, ids[2])
    (info,) = await client.xinfo_groups(CDC_STREAM)
    assert info.get("lag") is None

    health = group(await read_health(client), CDC_STREAM, INGEST_GROUP)

    assert health.lag_entries == 2
    assert health.lag_seconds >= 8.0


async def test_dead_letters_are_counted_per_stream(client: "redis.Redis") -> None:
    for _ in range(2):
        await client.xadd(dead_letter_stream(CDC_STREAM), event_fields())  # type: ignore[arg-type]
    await client.xadd(dead_letter_stream(CQRS_STREAM), event_fields())  # type: ignore[arg-type]

    snapshot = await read_health(client)

    assert snapshot.dead_letters == {CDC_STREAM: 2, CQRS_STREAM: 1}
    assert snapshot.dead_letter_total == 3


async def test_relay_lag_comes_from_the_relays_reports(client: "redis.Redis") -> None:
    now = time.time()
    stale_for = RELAY_REPORT_STALE_SECONDS + 20
    await client.hset(
        RELAY_LAG_KEY,
        mapping={
            CDC_RELAY_NAME: "3.5", f"{CDC_RELAY_NAME}:at": str(now),
            # A relay that stopped reporting lags by at least the time since its last report.
            OUTBOX_RELAY_NAME: "0", f"{OUTBOX_RELAY_NAME}:at": str(now - stale_for),
        },
    )

    snapshot = await read_health(client)

    assert snapshot.relay_lag_seconds[CDC_RELAY_NAME] == 3.5
    assert snapshot.relay_lag_seconds[OUTBOX_RELAY_NAME] >= stale_for
    assert snapshot.max_lag_seconds >= stale_for


async def test_reconcile_summary_is_parsed(client: "redis.Redis") -> None:
    await client.hset(
        RECONCILE_LAST_KEY,
        mapping={
            "finished_at": "1733353200.5", "missing": "1", "stale": "2", "conflicting": "0",
            "drift_entities": "3", "repaired": "0", "report": "{}", "duration_seconds": "0.2",
        },
    )
    summary = (await read_health(client)).reconcile
    assert summary is not None
    assert (summary.finished_at, summary.missing, summary.stale, summary.drift_entities) == (
        1733353200.5, 1, 2, 3,
    )

    # An unreadable total falls back to the sum of its parts rather than hiding drift.
    await client.hset(RECONCILE_LAST_KEY, "drift_entities", "many")
    summary = (await read_health(client)).reconcile
    assert summary is not None
    assert summary.drift_entities == 3


def test_snapshot_dict_times_are_iso() -> None:
    snapshot = HealthSnapshot(
        taken_at=1733353200.25,
        groups=(GroupHealth(CDC_STREAM, INGEST_GROUP, pending=1, lag_entries=2, lag_seconds=4.5),),
        dead_letters={CDC_STREAM: 1},
        relay_lag_seconds={CDC_RELAY_NAME: 3.5},
        reconcile=ReconcileSummary(
            finished_at=1733353200.5, missing=1, stale=0, conflicting=0, drift_entities=1
        ),
    )

    body = snapshot.to_dict()

    assert body["taken_at"] == "2024-12-04T23:00:00.250000Z"
    assert body["reconcile"]["finished_at"] == "2024-12-04T23:00:00.500000Z"
    assert body["reconcile"]["drift_entities"] == 1
    # Lags are durations, so they stay numbers of seconds.
    assert body["max_lag_seconds"] == 4.5
    assert body["groups"][0]["lag_seconds"] == 4.5
    assert body["relay_lag_seconds"] == {CDC_RELAY_NAME: 3.5}
    # The snapshot itself keeps epoch seconds.
    assert snapshot.taken_at == 1733353200.25


def test_snapshot_dict_without_reconcile() -> None:
    snapshot = HealthSnapshot(
        taken_at=0.0, groups=(), dead_letters={}, relay_lag_seconds={}, reconcile=None
    )

    body = snapshot.to_dict()

    assert body["taken_at"] == "1970-01-01T00:00:00.000000Z"
    assert body["reconcile"] is None
    assert body["max_lag_seconds"] == 0.0


async def test_cqrs_metrics_show_the_health_gauges(
    client: "redis.Redis", data_dir: Path, redis_url: str, signing_key: SigningKey
) -> None:
    await ensure_group(client, CDC_STREAM, INGEST_GROUP)
    await append_at(client, CDC_STREAM, seconds_ago=7)
    await client.xadd(dead_letter_stream(CQRS_STREAM), event_fields())  # type: ignore[arg-type]
    await client.hset(
        RELAY_LAG_KEY, mapping={CDC_RELAY_NAME: "1.25", f"{CDC_RELAY_NAME}:at": str(time.time())}
    )

    async with api_client(cqrs_settings(data_dir, redis_url), signing_key) as (http, _app):
        response = await http.get("/metrics")

    assert response.status_code == 200
    samples = parse_samples(response.text)
    lag = samples[f'ztcqrs_stream_lag_seconds{{group="{INGEST_GROUP}",stream="{CDC_STREAM}"}}']
    assert lag >= 7.0
    assert samples[
        f'ztcqrs_stream_lag_entries{{group="{INGEST_GROUP}",stream="{CDC_STREAM}"}}'
    ] == 1.0
    assert samples[
        f'ztcqrs_stream_pending_entries{{group="{INGEST_GROUP}",stream="{CDC_STREAM}"}}'
    ] == 0.0
    assert samples[f'ztcqrs_dead_letter_entries{{stream="{CQRS_STREAM}"}}'] == 1.0
    assert samples[f'ztcqrs_relay_lag_seconds{{relay="{CDC_RELAY_NAME}"}}'] == 1.25


def parse_samples(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples



def test_write_model_conflicts_counted(data_dir: Path, redis_url: str) -> None:
    engine = open_write_model(cqrs_settings(data_dir, redis_url))
    state = {
        "id": "o-conflict", "user_id": "alice",
        "items": [{"product_id": "prod-mouse", "quantity": 1, "unit_price": 2900}],
        "total_amount": 2900, "status": "pending", "version": 1,
        "created_at": "2026-01-31T12:00:00.000000Z", "updated_at": "2026-01-31T12:00:00.000000Z",
    }
    labels = {"side": "cqrs-write", "resolution": Decision.CONFLICT_APPLY.value}
    before = REGISTRY.get_sample_value("ztcqrs_sync_conflicts_total", labels) or 0.0
    try:
        first = order_event(state, action="created", origin="monolith")
        assert apply_event(engine, first, authority="monolith") is Decision.APPLY
        other = order_event({**state, "status": "paid"}, action="updated", origin="monolith")
        assert apply_event(engine, other, authority="monolith") is Decision.CONFLICT_APPLY
    finally:
        engine.dispose()

    assert REGISTRY.get_sample_value("ztcqrs_sync_conflicts_total", labels) == before + 1
