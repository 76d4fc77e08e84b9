"""The router's guard end to end: a real uvicorn router, real aiohttp upstreams and a real Redis.

Each test makes the migration unhealthy the way production would show it (a reconcile report
with drift, an old unconsumed stream entry, a dead letter, a CQRS service that returns 500) and
checks that requests meant for cqrs reach the monolith within seconds, and that the status names
the threshold and the value.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from services.router.rules import RulesError, parse_rules
from services.shared.clock import format_timestamp, parse_timestamp
from services.shared.names import (
    CDC_STREAM,
    GRAY_GUARD_KEY,
    INGEST_GROUP,
    RECONCILE_LAST_KEY,
    dead_letter_stream,
)
from tests.conftest import SigningKey, free_port
from tests.router_support import StandIn, router_settings, running_router

# The guard checks every 0.1 s in these tests. The wait is long because the machine may be busy.
WAIT_SECONDS = 10.0

RULES = """\
version: 1
salt: guard-test
default_target: monolith
guard:
  frozen: {frozen}
  reset_at: {reset_at}
  check_interval_seconds: 0.1
  thresholds:
    drift_entities: 0
    lag_seconds: 30
    dead_letters: 0
    cqrs_error_rate: 0.5
    error_window_seconds: 60
    min_requests: 5
rules:
  - name: products-on-cqrs
    match:
      paths: ["/products/**"]
    target: cqrs
"""


def rules_text(*, frozen: bool = False, reset_at: str | None = None) -> str:
    return RULES.format(
        frozen="true" if frozen else "false", reset_at=f'"{reset_at}"' if reset_at else "null"
    )


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text())
    return path


@pytest.fixture
def store(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)



@pytest.fixture
async def start_router(
    signing_key: SigningKey, rules_file: Path, monolith: StandIn, cqrs: StandIn, redis_url: str
) -> AsyncIterator[Callable[..., Awaitable[httpx.AsyncClient]]]:
    """Start routers on the test's rules file, Redis and upstreams. Each call starts one more."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> httpx.AsyncClient:
            values = {"redis_url": redis_url, **overrides}
            settings = router_settings(rules_file, monolith.url, cqrs.url, **values)
            return await stack.enter_async_context(running_router(signing_key, settings))

        yield start


@pytest.fixture
def admin(signing_key: SigningKey) -> dict[str, str]:
    token = signing_key.token("ztcqrs-admin", client_id="ztcqrs-admin", scope="gray:admin")
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def user(signing_key: SigningKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {signing_key.token('alice')}"}


async def wait_for_target(
    client: httpx.AsyncClient, headers: dict[str, str], target: str
) -> httpx.Response:
    """Request GET /products until it is served by `target`, and return that response."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        response = await client.get("/products", headers=headers)
        if response.headers["x-gray-target"] == target or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.05)


async def guard_status(client: httpx.AsyncClient, admin: dict[str, str]) -> dict[str, Any]:
    response = await client.get("/_gray/status", headers=admin)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def write_rules(path: Path, text: str) -> None:
    path.write_text(text)


def assert_iso_time(value: Any) -> datetime:
    """Check that `value` is a status time in the format of `loaded_at`, and return it."""
    assert isinstance(value, str), f"expected an ISO 8601 string, got {value!r}"
    moment = parse_timestamp(value)
    assert format_timestamp(moment) == value
    return moment


def write_drift(store: redis.Redis, *, finished_at: float, drift: int) -> None:
    store.hset(
        RECONCILE_LAST_KEY,
        mapping={
            "finished_at": repr(finished_at), "missing": drift, "stale": 0, "conflicting": 0,
            "drift_entities": drift, "repaired": 0, "report": "[]", "duration_seconds": "0.1",
        },
    )


async def test_guard_routes_to_cqrs_while_healthy(
    start_router: Callable[..., Awaitable[httpx.AsyncClient]],
    user: dict[str, str],
    admin: dict[str, str],
    store: redis.Redis,
) -> None:
    router = await start_router()
    write_drift(store, finished_at=time.time(), drift=0)

    response = await router.get("/products", headers=user)
    await asyncio.sleep(0.5)
    later = await router.get("/products", headers=user)
    status = await guard_status(router, admin)

    assert response.headers["x-gray-target"] == "cqrs"
    assert later.headers["x-gray-target"] == "cqrs"
    assert later.headers["x-gray-rule"] == "products-on-cqrs"
    assert status["guard"]["tripped"] is False
    assert status["guard"]["frozen"] is False
    assert status["guard"]["tripped_at"] is None
    assert status["guard"]["reset_at"] is None
    assert status["health"]["reconcile"]["drift_entities"] == 0
    assert store.exists(GRAY_GUARD_KEY) == 0


async def test_status_phase_and_times(
    start_router: Callable[..., Awaitable[httpx.AsyncClient]],
    user: dict[str, str],
    admin: dict[str, str],
    store: redis.Redis,
) -> None:
    router = await start_router(phase="cutover")
    finished_at = time.time() - 30
    write_drift(store, finished_at=finished_at, drift=0)
    await router.get("/products", headers=user)
    await asyncio.sleep(0.5)

    status = await guard_status(router, admin)

    assert status["phase"] == "cutover"
    loaded_at = assert_iso_time(status["loaded_at"])
    checked_at = assert_iso_time(status["guard"]["checked_at"])
    taken_at = assert_iso_time(status["health"]["taken_at"])
    assert loaded_at <= checked_at
    assert abs(taken_at.timestamp() - time.time()) < WAIT_SECONDS
    assert status["health"]["reconcile"]["finished_at"] == format_timestamp(
        datetime.fromtimestamp(finished_at, UTC)
    )
    starts = [assert_iso_time(bucket["start"]) for bucket in status["split"]["buckets"]]
    assert starts == sorted(starts)
    assert (starts[1] - starts[0]).total_seconds() == status["split"]["bucket_seconds"]
    # Durations stay numbers of seconds.
    assert isinstance(status["health"]["max_lag_seconds"], int | float)


async def test_guard_trips_on_drift(
    start_router: Callable[..., Awaitable[httpx.AsyncClient]],
    user: dict[str, str],
    admin: dict[str, str],
    store: redis.Redis,
) -> None:
    router = await start_router()
    write_drift(store, finished_at=time.time(), drift=3)

    response = await wait_for_target(router, user, "monolith")
    on_monolith = await router.get("/orders", headers=user)
    guard = (await guard_status(router, admin))["guard"]

    assert response.headers["x-gray-target"] == "monolith"
    assert response.headers["x-gray-rule"] == "guard"
    assert on_monolith.headers["x-gray-rule"] == "default"
    assert guard["tripped"] is True
    assert guard["threshold"] == "drift_entities"
    assert guard["value"] == 3
    assert guard["limit"] == 0
    assert store.hget(GRAY_GUARD_KEY, "threshold") == "drift_entities"
    # The trip hash keeps epoch seconds, and the status shows the same moment as ISO 8601.
    tripped_at = float(store.hget(GRAY_GUARD_KEY, "tripped_at") or "nan")
    assert guard["tripped_at"] == format_timestamp(datetime.fromtimestamp(tripped_at, UTC))


async def test_guard_trips_on_lag(
    start_router: Callable[..., Awaitable[httpx.AsyncClient]],
    user: dict[str, str],
    admin: dict[str, str],
    store: redis.Redis,
) -> None:
    router = await start_router()
    # An entry appended two minutes ago that the ingest group never read.
    two_minutes_ago_ms = int(time.time() * 1000) - 120_000
    store.xadd(CDC_STREAM, {"payload": "{}"}, id=f"{two_minutes_ago_ms}-0")
    store.xgroup_create(CDC_STREAM, INGEST_GROUP, id="0")

    response = await wait_for_target(router, user, "monolith")
    guard = (await guard_status(router, admin))["guard"]

    assert response.headers["x-gray-rule"] == "guard"
    assert guard["threshold"] == "lag_seconds"
    assert guard["value"] >= 120
    assert guard["limit"] == 30


async def test_guard_trips_on_dead_letters(
    start_router: Callable[..., Awaitable[httpx.AsyncClient]],
    user: dict[str, str],
    admin: dict[str, str],
    store: redis.Redis,
) -> None:
    router = await start_router()
    store.xadd(dead_letter_stream(CDC_STREAM), {"payload": "{}", "dlq_error": "boom"})

    response = await wait_for_target(router, user, "monolith")
    guard = (await guard_status(router, admin))["guard"]

    assert response.headers["x-gray-rule"] == "guard"
    assert guard["threshold"] == "dead_letters"
    assert guard["value"] == 1
    assert guard["limit"] == 0


async def test_guard_trips_on_cqrs_errors_everywhere(
    start_router: Callable[..., Awaitable[httpx.AsyncClient]],
    cqrs: StandIn,
    user: dict[str, str],
    admin: dict[str, str],
) -> None:
    cqrs.status = 500
    first = await start_router()
    second = await start_router()

    failures = [await first.get("/products", headers=user) for _ in range(5)]
    response = await wait_for_target(first, user, "monolith")
    # The second router served no CQRS request, so only the shared trip can divert it.
    other = await wait_for_target(second, user, "monolith")
    guard = (await guard_status(second, admin))["guard"]

    assert [failure.status_code for failure in failures] == [500] * 5
    assert response.headers["x-gray-rule"] == "guard"
    assert other.headers["x-gray-rule"] == "guard"
    assert guard["threshold"] == "cqrs_error_rate"
    assert guard["value"] == 1.0
    assert guard["limit"] == 0.5


async def test_guard_ignores_errors_below_min_requests(
    start_router: Callable[..., Awaitable[httpx.AsyncClient]],
    cqrs: StandIn,
    user: dict[str, str],
    admin: dict[str, str],
) -> None:
    cqrs.status = 500
    router = await start_router()

    failures = [await router.get("/products", headers=user) for _ in range(4)]
    await asyncio.sleep(0.5)
    status = await guard_status(router, admin)

    assert [failure.headers["x-gray-target"] for failure in failures] == ["cqrs"] * 4
    assert status["guard"]["tripped"] is False


async def test_guard_frozen_routes_to_monolith(
    start_router: Callable[..., Awaitable[httpx.AsyncClient]],
    rules_file: Path,
    user: dict[str, str],
    admin: dict[str, str],
    store: redis.Redis,
) -> None:
    write_rules(rules_file, rules_text(frozen=True))
    router = await start_router()

    response = await router.get("/products", headers=user)
    guard = (await guard_status(router, admin))["guard"]

    assert response.headers["x-gray-target"] == "monolith"
    assert response.headers["x-gray-rule"] == "guard"
    assert guard["frozen"] is True
    assert guard["tripped"] is False
    assert store.exists(GRAY_GUARD_KEY) == 0


async def test_guard_reset_at_clears_trip(
    start_router: Callable[..., Awaitable[httpx.AsyncClient]],
    rules_file: Path,
    user: dict[str, str],
    admin: dict[str, str],
    store: redis.Redis,
) -> None:
    router = await start_router()
    write_drift(store, finished_at=time.time(), drift=2)
    tripped = await wait_for_target(router, user, "monolith")
    assert tripped.headers["x-gray-rule"] == "guard"

    reset_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    write_rules(rules_file, rules_text(reset_at=reset_at))
    response = await wait_for_target(router, user, "cqrs")
    await asyncio.sleep(0.5)
    status = await guard_status(router, admin)

    assert response.headers["x-gray-rule"] == "products-on-cqrs"
    assert store.exists(GRAY_GUARD_KEY) == 0
    # The reconcile report from before the reset does not trip the guard again.
    assert status["guard"]["tripped"] is False
    assert status["guard"]["reset_at"] == format_timestamp(datetime.fromisoformat(reset_at))


async def test_guard_fails_safe_without_redis(
    start_router: Callable[..., Awaitable[httpx.AsyncClient]],
    user: dict[str, str],
    admin: dict[str, str],
) -> None:
    # Nothing listens on this port, so no health can be read.
    router = await start_router(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", guard_fail_safe_seconds=0.5
    )

    response = await wait_for_target(router, user, "monolith")
    guard = (await guard_status(router, admin))["guard"]

    assert response.headers["x-gray-rule"] == "guard"
    assert guard["tripped"] is True
    assert guard["threshold"] == "health_unreadable"
    assert guard["error"]
    assert assert_iso_time(guard["tripped_at"]) <= datetime.now(UTC)
    assert guard["checked_at"] is None


async def test_status_split_counts_targets(
    start_router: Callable[..., Awaitable[httpx.AsyncClient]],
    user: dict[str, str],
    admin: dict[str, str],
) -> None:
    router = await start_router()
    for _ in range(3):
        await router.get("/products", headers=user)
    await router.get("/orders", headers=user)

    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        split = (await guard_status(router, admin))["split"]
        totals = {
            target: sum(bucket[target] for bucket in split["buckets"])
            for target in ("monolith", "cqrs")
        }
        if totals == {"monolith": 1, "cqrs": 3} or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)

    assert totals == {"monolith": 1, "cqrs": 3}
    assert split["bucket_seconds"] == 10
    assert len(split["buckets"]) == 60
    assert "error" not in split


def test_guard_rules_parse_defaults() -> None:
    rules = parse_rules("version: 1\ndefault_target: monolith\n")

    assert rules.guard.frozen is False
    assert rules.guard.reset_at is None
    assert rules.guard.thresholds.any_set is False


def test_guard_rules_parse_full_section() -> None:
    text = rules_text(reset_at="2025-01-31T12:00:00Z")
    unquoted = text.replace('"2025-01-31T12:00:00Z"', "2025-01-31T12:00:00Z")

    for document in (text, unquoted):
        guard = parse_rules(document).guard
        assert guard.reset_at == datetime(2025, 1, 31, 12, tzinfo=UTC).timestamp()
        assert guard.check_interval_seconds == 0.1
        assert guard.thresholds.cqrs_error_rate == 0.5
        assert guard.thresholds.min_requests == 5


INVALID_GUARDS = [
    ("guard: [1]", "guard must be a mapping"),
    ("guard: {frozen: 'yes'}", "guard.frozen must be true or false"),
    ("guard: {paused: true}", "unknown field 'paused' in guard"),
    ("guard: {reset_at: yesterday}", "guard.reset_at must be an ISO 8601 time"),
    ("guard: {check_interval_seconds: 0}", "guard.check_interval_seconds must be above 0"),
    ("guard: {thresholds: {lag: 3}}", "unknown field 'lag' in guard.thresholds"),
    ("guard: {thresholds: {drift_entities: 0.5}}", "drift_entities must be an integer"),
    ("guard: {thresholds: {lag_seconds: -1}}", "lag_seconds must be 0 or more"),
    ("guard: {thresholds: {cqrs_error_rate: 2}}", "cqrs_error_rate must be between 0 and 1"),
    ("guard: {thresholds: {error_window_seconds: 0}}", "error_window_seconds must be between"),
    ("guard: {thresholds: {min_requests: 0}}", "min_requests must be 1 or more"),
    ("guard: {thresholds: {lag_seconds: .nan}}", "lag_seconds must be a finite number"),
]


@pytest.mark.parametrize(("section", "message"), INVALID_GUARDS)
def test_guard_rules_reject_invalid(section: str, message: str) -> None:
    with pytest.raises(RulesError) as raised:
        parse_rules(f"version: 1\ndefault_target: monolith\n{section}\n")

    assert message in str(raised.value)
