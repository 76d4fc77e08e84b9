"""Reverse sync against a local HTTP server with real RS256 service tokens.

The server replaces the monolith's internal sync API and the auth server's token endpoint.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as redis
from aiohttp import web

from services.cqrs.settings import Settings
from services.cqrs.workers import reverse_sync
from services.shared.errors import ServiceError
from services.shared.events import Event
from services.shared.names import CQRS_STREAM, REVERSE_SYNC_GROUP, dead_letter_stream
from services.shared.security import StaticKeySource, TokenVerifier
from services.shared.streams import append, connect
from tests.conftest import TEST_AUDIENCE, TEST_ISSUER, SigningKey, free_port
from tests.cqrs_support import FAST_OPTIONS, consume_once, cqrs_settings, order_event, product_event

CLIENT_SECRET = "test-sync-secret"


@dataclass
class FakeMonolith:
    """Stand-in for the monolith's `PUT /internal/sync/orders/{id}` and the auth `POST /token`.

    The token endpoint issues real RS256 client-credentials tokens and the sync endpoint verifies
    them, so the worker's token handling is exercised end to end.
    """

    signing_key: SigningKey
    # Per order id, the statuses to reply with before falling back to 200.
    scripted: dict[str, list[int]] = field(default_factory=dict)
    puts: list[dict[str, Any]] = field(default_factory=list)
    token_requests: int = 0
    url: str = ""

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.token_requests += 1
        if form.get("grant_type") != "client_credentials" or (
            form.get("client_id"), form.get("client_secret")
        ) != ("cqrs-reverse-sync", CLIENT_SECRET):
            return web.json_response({"error": "invalid_client"}, status=401)
        access_token = self.signing_key.token(
            "cqrs-reverse-sync", client_id="cqrs-reverse-sync", scope="sync:write"
        )
        return web.json_response(
            {"access_token": access_token, "token_type": "Bearer", "expires_in": 300,
             "scope": "sync:write"}
        )

    async def sync_order(self, request: web.Request) -> web.Response:
        order_id = request.match_info["order_id"]
        verifier = TokenVerifier(
            StaticKeySource(self.signing_key.jwks), issuer=TEST_ISSUER, audience=TEST_AUDIENCE
        )
        try:
            principal = await verifier.verify(
                request.headers.get("Authorization", "").removeprefix("Bearer ")
            )
            principal.require_scope("sync:write")
        except ServiceError as error:
            return web.json_response(error.to_body(), status=error.status_code)
        body = await request.json()
        self.puts.append({"order_id": order_id, "body": body, "client_id": principal.client_id})
        script = self.scripted.get(order_id, [])
        status = script.pop(0) if script else 200
        if status == 200:
            return web.json_response({"decision": "apply", "version": body["state"]["version"]})
        return web.json_response(
            {"error": "scripted_failure", "message": f"status {status} for {order_id}"},
            status=status,
        )


@pytest.fixture
async def monolith(signing_key: SigningKey) -> AsyncIterator[FakeMonolith]:
    fake = FakeMonolith(signing_key)
    app = web.Application()
    app.router.add_post("/token", fake.token)
    app.router.add_put("/internal/sync/orders/{order_id}", fake.sync_order)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.url = f"http://{host}:{port}"
    yield fake
    await runner.cleanup()


@pytest.fixture
def settings(data_dir: Path, redis_url: str, monolith: FakeMonolith) -> Settings:
    return settings_for(monolith, data_dir, redis_url)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator["redis.Redis"]:
    client = connect(redis_url)
    yield client
    await client.aclose()


def order_state(order_id: str, version: int = 1) -> dict[str, Any]:
    return {
        "id": order_id, "user_id": "alice",
        "items": [{"product_id": "prod-mouse", "quantity": 1, "unit_price": 2900}],
        "total_amount": 2900, "status": "pending" if version == 1 else "paid",
        "version": version, "created_at": "2026-01-31T12:00:00.000000Z",
        "updated_at": "2026-01-31T12:00:00.000000Z",
    }


async def sync_round(settings: Settings) -> int:
    client = connect(settings.redis_url)
    async with httpx.AsyncClient(timeout=5) as http:
        consumer = reverse_sync.build_consumer(settings, client, http, options=FAST_OPTIONS)
        handled = await consume_once(consumer)
    await client.aclose()
    return handled


async def pending_count(client: "redis.Redis") -> int:
    info = await client.xpending(CQRS_STREAM, REVERSE_SYNC_GROUP)
    return int(info["pending"])


async def test_sync_sends_cqrs_orders(
    settings: Settings, monolith: FakeMonolith, client: "redis.Redis"
) -> None:
    first = order_event(order_state("o1"), action="created", origin="cqrs")
    second = order_event(order_state("o1", 2), action="paid", origin="cqrs")
    await append(client, CQRS_STREAM, first)
    await append(client, CQRS_STREAM, second)

    assert await sync_round(settings) == 2

    assert [put["body"] for put in monolith.puts] == [
        {"state": first.data, "event_id": first.id},
        {"state": second.data, "event_id": second.id},
    ]
    assert {put["client_id"] for put in monolith.puts} == {"cqrs-reverse-sync"}
    assert monolith.token_requests == 1  # the token is cached across requests
    assert await pending_count(client) == 0


async def test_sync_skips_other_origins(
    settings: Settings, monolith: FakeMonolith, client: "redis.Redis"
) -> None:
    from_monolith = order_event(order_state("o1"), action="updated", origin="monolith")
    product = product_event({"id": "prod-x", "name": "X", "price": 1}, version=1, origin="cqrs")
    await append(client, CQRS_STREAM, from_monolith)
    await append(client, CQRS_STREAM, product)

    assert await sync_round(settings) == 2

    assert monolith.puts == []
    assert monolith.token_requests == 0
    assert await pending_count(client) == 0


async def test_sync_retries_server_error(
    settings: Settings, monolith: FakeMonolith, client: "redis.Redis"
) -> None:
    monolith.scripted["o1"] = [500]
    await append(client, CQRS_STREAM, order_event(order_state("o1"), action="created",
                                                  origin="cqrs"))

    assert await sync_round(settings) == 0
    assert await pending_count(client) == 1
    assert await sync_round(settings) == 1

    assert len(monolith.puts) == 2
    assert await pending_count(client) == 0
    assert await client.xlen(dead_letter_stream(CQRS_STREAM)) == 0


async def test_sync_dead_letters_client_error(
    settings: Settings, monolith: FakeMonolith, client: "redis.Redis"
) -> None:
    monolith.scripted["o1"] = [422]
    event = order_event(order_state("o1"), action="created", origin="cqrs")
    await append(client, CQRS_STREAM, event)

    assert await sync_round(settings) == 0

    assert len(monolith.puts) == 1
    assert await pending_count(client) == 0
    dead = await client.xrange(dead_letter_stream(CQRS_STREAM))
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields["id"] == event.id
    assert fields["dlq_group"] == REVERSE_SYNC_GROUP
    assert fields["dlq_error"].startswith("PermanentFailure")
    assert "HTTP 422" in fields["dlq_error"]
    assert "scripted_failure" in fields["dlq_error"]


async def test_sync_renews_token_on_401(
    settings: Settings, monolith: FakeMonolith, client: "redis.Redis"
) -> None:
    monolith.scripted["o1"] = [401]
    await append(client, CQRS_STREAM, order_event(order_state("o1"), action="created",
                                                  origin="cqrs"))

    assert await sync_round(settings) == 1

    assert len(monolith.puts) == 2
    assert monolith.token_requests == 2
    assert await pending_count(client) == 0


async def test_sync_retries_when_monolith_down(
    data_dir: Path, redis_url: str, monolith: FakeMonolith, client: "redis.Redis"
) -> None:
    settings = cqrs_settings(
        data_dir, redis_url, monolith_url=f"http://127.0.0.1:{free_port()}",
        token_url=f"{monolith.url}/token", sync_client_secret=CLIENT_SECRET,
    )
    await append(client, CQRS_STREAM, order_event(order_state("o1"), action="created",
                                                  origin="cqrs"))

    assert await sync_round(settings) == 0

    assert await pending_count(client) == 1
    assert await client.xlen(dead_letter_stream(CQRS_STREAM)) == 0


async def test_sync_wrong_secret_not_sent(
    data_dir: Path, redis_url: str, monolith: FakeMonolith, client: "redis.Redis"
) -> None:
    settings = cqrs_settings(
        data_dir, redis_url, monolith_url=monolith.url, token_url=f"{monolith.url}/token",
        sync_client_secret="wrong-secret",
    )
    await append(client, CQRS_STREAM, order_event(order_state("o1"), action="created",
                                                  origin="cqrs"))

    assert await sync_round(settings) == 0

    assert monolith.token_requests == 1
    assert monolith.puts == []
    assert await pending_count(client) == 1


async def test_sync_group_after_entries(
    settings: Settings, monolith: FakeMonolith, client: "redis.Redis"
) -> None:
    events = [order_event(order_state(f"o{index}"), action="created", origin="cqrs")
              for index in range(3)]
    for event in events:
        await append(client, CQRS_STREAM, event)
    groups = await client.xinfo_groups(CQRS_STREAM)
    assert groups == []

    assert await sync_round(settings) == 3
    assert [put["body"]["event_id"] for put in monolith.puts] == [event.id for event in events]


async def test_sync_run_until_stopped(
    settings: Settings, monolith: FakeMonolith, client: "redis.Redis"
) -> None:
    event: Event = order_event(order_state("o1"), action="created", origin="cqrs")
    await append(client, CQRS_STREAM, event)
    stop = asyncio.Event()
    task = asyncio.create_task(reverse_sync.run(settings, stop))

    for _ in range(200):
        if monolith.puts:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, timeout=3)

    assert [put["body"]["event_id"] for put in monolith.puts] == [event.id]


async def test_sync_down_longer_than_tries(
    data_dir: Path, redis_url: str, monolith: FakeMonolith, client: "redis.Redis"
) -> None:
    # An unreachable monolith is retried for as long as it is down; it never dead-letters.
    down = cqrs_settings(
        data_dir, redis_url, monolith_url=f"http://127.0.0.1:{free_port()}",
        token_url=f"{monolith.url}/token", sync_client_secret=CLIENT_SECRET,
    )
    event = order_event(order_state("o1"), action="created", origin="cqrs")
    await append(client, CQRS_STREAM, event)
    monolith.scripted["o1"] = [503, 502, 500]

    for _round in range(FAST_OPTIONS.max_tries * 2):
        assert await sync_round(down) == 0
    up = settings_for(monolith, data_dir, redis_url)
    for _status in range(3):
        assert await sync_round(up) == 0

    assert await client.xlen(dead_letter_stream(CQRS_STREAM)) == 0
    assert await sync_round(up) == 1
    assert [put["body"]["event_id"] for put in monolith.puts] == [event.id] * 4
    assert await pending_count(client) == 0


def settings_for(monolith: FakeMonolith, data_dir: Path, redis_url: str) -> Settings:
    return cqrs_settings(
        data_dir, redis_url, monolith_url=monolith.url, token_url=f"{monolith.url}/token",
        sync_client_secret=CLIENT_SECRET,
    )
