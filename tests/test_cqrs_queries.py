"""CQRS queries: the Redis read model, consistency tokens and the write-model fallback."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis
from sqlalchemy import Engine

from services.cqrs.read_model import project_event
from services.cqrs.schema import open_write_model
from services.cqrs.settings import Settings
from services.cqrs.workers import projector
from services.cqrs.workers.outbox_relay import relay_once
from services.shared.domain import DEMO_PRODUCTS
from services.shared.names import order_key
from services.shared.streams import connect
from tests.conftest import SigningKey, free_port
from tests.cqrs_support import (
    FAST_OPTIONS,
    PRICES,
    api_client,
    consume_once,
    cqrs_settings,
    product_event,
    seed_products,
)

Headers = Callable[..., dict[str, str]]
READ_WAIT_MS = 300


@dataclass
class Service:
    client: httpx.AsyncClient
    engine: Engine
    redis: "redis.Redis"
    settings: Settings

    async def place_order(self, headers: dict[str, str], product_id: str = "prod-mouse") -> str:
        body = {"items": [{"product_id": product_id, "quantity": 1}]}
        response = await self.client.post("/commands/orders", json=body, headers=headers)
        assert response.status_code == 201
        order_id: str = response.json()["id"]
        return order_id

    async def project(self) -> None:
        """Relay the outbox and let the projector handle everything on the streams."""
        await relay_once(self.engine, self.redis, batch_size=100)
        await consume_once(
            projector.build_consumer(self.settings, self.redis, options=FAST_OPTIONS)
        )


@pytest.fixture
async def service(
    data_dir: Path, redis_url: str, signing_key: SigningKey
) -> AsyncIterator[Service]:
    settings = cqrs_settings(data_dir, redis_url, read_wait_ms=READ_WAIT_MS)
    engine = open_write_model(settings)
    seed_products(engine)
    client = connect(redis_url)
    async with api_client(settings, signing_key) as (http, _app):
        yield Service(http, engine, client, settings)
    await client.aclose()
    engine.dispose()


async def test_query_order_before_projection(service: Service, auth_header: Headers) -> None:
    order_id = await service.place_order(auth_header("alice"))

    response = await service.client.get(f"/queries/orders/{order_id}", headers=auth_header())

    assert response.status_code == 200
    assert response.json()["id"] == order_id
    assert response.json()["version"] == 1
    assert await service.redis.exists(order_key(order_id)) == 0


async def test_query_order_of_other_user(service: Service, auth_header: Headers) -> None:
    order_id = await service.place_order(auth_header("alice"))
    await service.project()

    for path in (f"/queries/orders/{order_id}", "/queries/orders/no-such-order"):
        response = await service.client.get(path, headers=auth_header("bob"))
        assert response.status_code == 404, path
        assert response.json()["error"] == "not_found", path

    listed = await service.client.get("/queries/orders", headers=auth_header("bob"))
    assert listed.json() == {"orders": []}


async def test_query_token_behind_reads_write_model(
    service: Service, auth_header: Headers
) -> None:
    order_id = await service.place_order(auth_header())
    await service.project()  # the read model now contains version 1
    paid = await service.client.post(f"/commands/orders/{order_id}/pay", headers=auth_header())
    token = paid.headers["X-Consistency-Token"]
    assert token == f"{order_id}@2"

    plain = await service.client.get(f"/queries/orders/{order_id}", headers=auth_header())
    assert plain.json()["version"] == 1

    started = time.monotonic()
    consistent = await service.client.get(
        f"/queries/orders/{order_id}", headers={**auth_header(), "X-Consistency-Token": token}
    )
    elapsed = time.monotonic() - started
    assert consistent.status_code == 200
    assert consistent.json()["version"] == 2
    assert consistent.json()["status"] == "paid"
    assert elapsed >= READ_WAIT_MS / 1000

    listed = await service.client.get(
        "/queries/orders", headers={**auth_header(), "X-Consistency-Token": token}
    )
    assert [order["version"] for order in listed.json()["orders"]] == [2]


async def test_query_token_waits_for_projector(
    service: Service, auth_header: Headers
) -> None:
    service.settings.read_wait_ms = 10_000
    order_id = await service.place_order(auth_header())
    headers = {**auth_header(), "X-Consistency-Token": f"{order_id}@1"}

    async def project_later() -> None:
        await asyncio.sleep(0.2)
        await service.project()

    started = time.monotonic()
    response, _ = await asyncio.gather(
        service.client.get(f"/queries/orders/{order_id}", headers=headers), project_later()
    )
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert response.json()["version"] == 1
    assert elapsed >= 0.2
    assert elapsed < 5  # returned when the projector caught up, long before the wait limit


async def test_query_list_uses_read_model(service: Service, auth_header: Headers) -> None:
    first = await service.place_order(auth_header("alice"), "prod-mouse")
    second = await service.place_order(auth_header("alice"), "prod-cable")
    await service.place_order(auth_header("bob"))

    before = await service.client.get("/queries/orders", headers=auth_header("alice"))
    assert before.json() == {"orders": []}

    await service.project()
    after = await service.client.get("/queries/orders", headers=auth_header("alice"))
    assert after.status_code == 200
    assert [order["id"] for order in after.json()["orders"]] == [second, first]
    assert after.json()["orders"][0]["items"][0]["unit_price"] == PRICES["prod-cable"]


async def test_query_malformed_token_ignored(service: Service, auth_header: Headers) -> None:
    order_id = await service.place_order(auth_header())

    for token in ("no-version", f"{order_id}@x", "@3"):
        response = await service.client.get(
            f"/queries/orders/{order_id}", headers={**auth_header(), "X-Consistency-Token": token}
        )
        assert response.status_code == 200, token


async def test_query_products_fallback(service: Service, auth_header: Headers) -> None:
    headers = auth_header(scope="products:read")

    from_write_model = await service.client.get("/queries/products", headers=headers)
    assert from_write_model.status_code == 200
    ids = [product["id"] for product in from_write_model.json()["products"]]
    assert ids == sorted(product["id"] for product in DEMO_PRODUCTS)

    # A newer price only in the read model shows that the read model is used once it has products.
    keyboard = DEMO_PRODUCTS[0]
    newer = product_event(keyboard, version=2, price=12_300)
    await project_event(service.redis, newer, authority="monolith")

    listed = await service.client.get("/queries/products", headers=headers)
    assert [product["id"] for product in listed.json()["products"]] == [keyboard["id"]]
    assert listed.json()["products"][0]["price"] == 12_300

    keyboard_response = await service.client.get(
        f"/queries/products/{keyboard['id']}", headers=headers
    )
    assert keyboard_response.json()["price"] == 12_300
    other = await service.client.get("/queries/products/prod-cable", headers=headers)
    assert other.status_code == 200
    assert other.json()["price"] == PRICES["prod-cable"]

    missing = await service.client.get("/queries/products/prod-none", headers=headers)
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"


async def test_query_scopes(service: Service, auth_header: Headers) -> None:
    order_id = await service.place_order(auth_header())
    no_orders = auth_header(scope="products:read")
    no_products = auth_header(scope="orders:read orders:write")

    assert (await service.client.get("/queries/orders", headers=no_orders)).status_code == 403
    single = await service.client.get(f"/queries/orders/{order_id}", headers=no_orders)
    assert single.status_code == 403
    products = await service.client.get("/queries/products", headers=no_products)
    assert products.status_code == 403
    assert (await service.client.get("/queries/orders")).status_code == 401


async def test_query_redis_down_is_503(
    data_dir: Path, signing_key: SigningKey, auth_header: Headers
) -> None:
    settings = cqrs_settings(data_dir, f"redis://127.0.0.1:{free_port()}/0")
    seed_products(open_write_model(settings))
    async with api_client(settings, signing_key) as (client, _app):
        created = await client.post(
            "/commands/orders", json={"items": [{"product_id": "prod-mouse", "quantity": 1}]},
            headers=auth_header(),
        )
        # Commands need only the write model, so they keep working while Redis is down.
        assert created.status_code == 201

        response = await client.get("/queries/orders", headers=auth_header())
        assert response.status_code == 503
        assert response.json()["error"] == "unavailable"
        assert response.headers["Retry-After"] == "1"

        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert "redis" in ready.json()["failures"]


async def test_readyz_ok(service: Service) -> None:
    response = await service.client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {"status": "ready"}
