"""Helpers for the CQRS service tests: settings, an in-process API client and event builders."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import Engine

from services.cqrs.app import create_app
from services.cqrs.settings import Settings
from services.cqrs.write_model import apply_event
from services.shared.clock import utc_now
from services.shared.consistency import Decision
from services.shared.domain import DEMO_PRODUCTS
from services.shared.events import Event
from services.shared.names import ORIGIN_MONOLITH
from services.shared.security import StaticKeySource
from services.shared.streams import ConsumerOptions, StreamConsumer
from tests.conftest import TEST_ISSUER, SigningKey

PRICES = {product["id"]: product["price"] for product in DEMO_PRODUCTS}

# Short blocking reads and retries, so a test's poll() returns in milliseconds.
FAST_OPTIONS = ConsumerOptions(
    max_tries=3, claim_idle_ms=60_000, block_ms=20, retry_base_seconds=0.02, retry_max_seconds=0.1
)


async def consume_once(consumer: StreamConsumer) -> int:
    """Create the consumer's groups if needed, handle what the streams hold, return the count."""
    await consumer.setup()
    return await consumer.poll()


def cqrs_settings(data_dir: Path, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir, "redis_url": redis_url, "token_issuer": TEST_ISSUER,
        "consumer_name": "test-consumer", **overrides,
    }
    return Settings(**values)


def product_event(
    product: dict[str, Any],
    *,
    version: int,
    price: int | None = None,
    action: str = "updated",
    origin: str = ORIGIN_MONOLITH,
) -> Event:
    """Build a CDC product event, as the monolith's relay publishes it."""
    state = {
        "id": product["id"], "name": product["name"],
        "price": product["price"] if price is None else price,
        "version": version, "updated_at": utc_now(),
    }
    return Event.for_aggregate(
        source="/monolith/cdc", aggregate="product", aggregate_id=product["id"], action=action,
        state=state, origin=origin,
    )


def order_event(state: dict[str, Any], *, action: str, origin: str) -> Event:
    return Event.for_aggregate(
        source="/test", aggregate="order", aggregate_id=state["id"], action=action,
        state=state, origin=origin,
    )


def seed_products(engine: Engine) -> None:
    """Apply the demo catalogue to the write model through the path CDC ingest uses."""
    for product in DEMO_PRODUCTS:
        decision = apply_event(engine, product_event(product, version=1), authority="monolith")
        assert decision is Decision.APPLY


@asynccontextmanager
async def api_client(
    settings: Settings, signing_key: SigningKey
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """Serve the CQRS app in process; the app's connections are closed on exit."""
    app = create_app(settings, key_source=StaticKeySource(signing_key.jwks))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://cqrs.test") as client:
            yield client, app
    finally:
        await app.state.resources.aclose()
