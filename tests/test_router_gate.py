"""The per-user gate against a real Redis: a real uvicorn router in front of two real aiohttp
stand-ins, with the replication markers written to Redis as the CDC relay and the workers do.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY

from services.router.app import RouterApp, create_app
from services.router.gate import UserGate
from services.router.rules import Decision, GateConfig, RulesError, parse_rules
from services.shared.names import GATE_GROUPS, GATE_PUBLISHED_KEY, gate_applied_key
from services.shared.security import StaticKeySource
from tests.conftest import SigningKey, free_port
from tests.router_support import StandIn, router_settings, serve

AuthHeader = Callable[..., dict[str, str]]
WAIT_SECONDS = 10.0

RULES = """\
version: 1
salt: gate-test
default_target: monolith
rules:
  - name: everyone
    match:
      paths: ["/orders/**"]
    target: cqrs
    fallback: monolith
  - name: default
    target: monolith
gate:
  enabled: {enabled}
"""


@pytest.fixture
async def markers(redis_url: str) -> AsyncIterator["redis.Redis"]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    await client.delete(GATE_PUBLISHED_KEY, *(gate_applied_key(group) for group in GATE_GROUPS))
    yield client
    await client.aclose()


@asynccontextmanager
async def gated_router(
    tmp_path: Path, signing_key: SigningKey, monolith: StandIn, cqrs: StandIn, redis_url: str,
    *, enabled: bool = True,
) -> AsyncIterator[tuple[RouterApp, httpx.AsyncClient]]:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES.format(enabled="true" if enabled else "false"))
    settings = router_settings(rules_file, monolith.url, cqrs.url, redis_url=redis_url)
    app = create_app(settings, key_source=StaticKeySource(signing_key.jwks))
    async with serve(app) as base_url, httpx.AsyncClient(
        base_url=base_url, trust_env=False, timeout=10
    ) as client:
        yield app, client


def held_count(rule: str) -> float:
    return REGISTRY.get_sample_value("ztcqrs_router_gate_held_total", {"rule": rule}) or 0.0


async def target_of(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    response = await client.get("/orders/o1", headers=headers)
    assert response.status_code == 200
    assert response.headers["x-gray-rule"] == "everyone"
    return response.headers["x-gray-target"]


async def wait_for_target(
    client: httpx.AsyncClient, headers: dict[str, str], expected: str
) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while await target_of(client, headers) != expected:
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"requests did not move to {expected} within {WAIT_SECONDS} s")
        await asyncio.sleep(0.05)


async def test_gate_holds_until_markers_catch_up(
    tmp_path: Path, signing_key: SigningKey, auth_header: AuthHeader, monolith: StandIn,
    cqrs: StandIn, redis_url: str, markers: "redis.Redis",
) -> None:
    await markers.hset(GATE_PUBLISHED_KEY, "alice", "1700000000000-3")
    await markers.hset(gate_applied_key(GATE_GROUPS[0]), "alice", "1700000000000-3")
    await markers.hset(gate_applied_key(GATE_GROUPS[1]), "alice", "1700000000000-2")
    held_before = held_count("everyone")
    async with gated_router(tmp_path, signing_key, monolith, cqrs, redis_url) as (app, client):
        first = await target_of(client, auth_header("alice"))
        await wait_until_checked(app)
        # Checked again at most once a second, and each time one group is still behind.
        for _ in range(5):
            assert await target_of(client, auth_header("alice")) == "monolith"
            await asyncio.sleep(0.3)
        waiting = app.gate.status()["users_waiting"]

        await markers.hset(gate_applied_key(GATE_GROUPS[1]), "alice", "1700000000000-10")
        await wait_for_target(client, auth_header("alice"), "cqrs")
        admin = auth_header("operator", scope="gray:admin")
        status = (await client.get("/_gray/status", headers=admin)).json()

    assert first == "monolith"
    assert waiting == 1
    held = app.gate.status()["held"]
    assert held >= 6
    assert held_count("everyone") - held_before == held
    assert cqrs.requests[-1].path == "/queries/orders/o1"
    assert status["gate"]["enabled"] is True
    assert status["gate"]["held"] == held
    assert status["gate"]["users_waiting"] == 0
    assert status["gate"]["users_allowed"] == 1


async def test_gate_user_without_markers_moves(
    tmp_path: Path, signing_key: SigningKey, auth_header: AuthHeader, monolith: StandIn,
    cqrs: StandIn, redis_url: str, markers: "redis.Redis",
) -> None:
    async with gated_router(tmp_path, signing_key, monolith, cqrs, redis_url) as (app, client):
        # Until the background check has answered, the user is held.
        first = await target_of(client, auth_header("bob"))
        await wait_for_target(client, auth_header("bob"), "cqrs")

    assert first == "monolith"
    assert app.gate.status()["users_allowed"] == 1


async def test_gate_disabled_sends_to_cqrs(
    tmp_path: Path, signing_key: SigningKey, auth_header: AuthHeader, monolith: StandIn,
    cqrs: StandIn, redis_url: str, markers: "redis.Redis",
) -> None:
    await markers.hset(GATE_PUBLISHED_KEY, "alice", "1700000000000-3")
    async with gated_router(
        tmp_path, signing_key, monolith, cqrs, redis_url, enabled=False
    ) as (app, client):
        target = await target_of(client, auth_header("alice"))

    assert target == "cqrs"
    assert app.gate.status()["held"] == 0


async def test_gate_ignores_routes_cqrs_lacks(redis_url: str, markers: "redis.Redis") -> None:
    gate = UserGate(markers)
    cqrs_decision = Decision("everyone", "cqrs", "monolith")

    unmapped = gate.admit(cqrs_decision, "alice", "DELETE", "/orders/o1")
    monolith_decision = gate.admit(Decision("default", "monolith", None), "alice", "GET", "/orders")
    anonymous = gate.admit(cqrs_decision, None, "GET", "/orders")

    assert unmapped == cqrs_decision
    assert monolith_decision.target == "monolith"
    assert anonymous == cqrs_decision
    assert gate.status()["held"] == 0


async def test_gate_redis_down_holds() -> None:
    # Nothing listens on this port, so every check fails to connect.
    down = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    gate = UserGate(down)
    decision = Decision("everyone", "cqrs", "monolith")
    try:
        held = gate.admit(decision, "alice", "GET", "/orders/o1")
        await wait_until_checked_gate(gate)
        again = gate.admit(decision, "alice", "GET", "/orders/o1")
    finally:
        await gate.close()
        await down.aclose()

    assert held == Decision("everyone", "monolith", None)
    assert again.target == "monolith"
    assert gate.status()["check_failures"] == 1
    assert gate.status()["users_waiting"] == 1


def test_gate_rules_parsed() -> None:
    assert parse_rules(RULES.format(enabled="true")).gate == GateConfig(enabled=True)
    assert parse_rules("version: 1\ndefault_target: monolith\n").gate == GateConfig(enabled=False)
    with pytest.raises(RulesError, match=r"gate\.enabled must be true or false"):
        parse_rules(RULES.format(enabled="1"))
    with pytest.raises(RulesError, match="unknown field 'users' in gate"):
        parse_rules("version: 1\ndefault_target: monolith\ngate: {users: 1}\n")


async def wait_until_checked(app: RouterApp) -> None:
    await wait_until_checked_gate(app.gate)


async def wait_until_checked_gate(gate: UserGate) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while gate.status()["checks_in_flight"]:
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"the gate check did not finish within {WAIT_SECONDS} s")
        await asyncio.sleep(0.02)

