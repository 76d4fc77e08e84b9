"""Order commands of the CQRS service over HTTP, with a real SQLite write model and RS256 tokens."""

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select, text

from services.cqrs.schema import open_write_model, orders, outbox
from services.shared.clock import parse_timestamp
from services.shared.events import Event
from services.shared.names import CQRS_STREAM
from tests.conftest import SigningKey
from tests.cqrs_support import PRICES, api_client, cqrs_settings, seed_products

Headers = Callable[..., dict[str, str]]


@dataclass
class Service:
    client: httpx.AsyncClient
    engine: Engine


@pytest.fixture
async def service(
    data_dir: Path, redis_url: str, signing_key: SigningKey
) -> AsyncIterator[Service]:
    settings = cqrs_settings(data_dir, redis_url)
    engine = open_write_model(settings)
    seed_products(engine)
    async with api_client(settings, signing_key) as (client, _app):
        yield Service(client, engine)
    engine.dispose()


async def place_order(
    service: Service, headers: dict[str, str], items: list[dict[str, Any]] | None = None
) -> httpx.Response:
    body = {"items": items or [{"product_id": "prod-mouse", "quantity": 2}]}
    return await service.client.post("/commands/orders", json=body, headers=headers)


def outbox_events(engine: Engine) -> list[tuple[str, Event]]:
    with engine.connect() as connection:
        rows = connection.execute(select(outbox).order_by(outbox.c.seq)).all()
    return [(row.stream, Event.from_fields(json.loads(row.fields))) for row in rows]


async def test_create_order_prices_from_catalogue(service: Service, auth_header: Headers) -> None:
    items = [
        {"product_id": "prod-mouse", "quantity": 2},
        {"product_id": "prod-cable", "quantity": 3},
    ]
    response = await place_order(service, auth_header("alice"), items)

    assert response.status_code == 201
    order = response.json()
    assert order["user_id"] == "alice"
    assert order["status"] == "pending"
    assert order["version"] == 1
    assert len(order["id"]) == 32
    assert order["items"] == [
        {"product_id": "prod-mouse", "quantity": 2, "unit_price": PRICES["prod-mouse"]},
        {"product_id": "prod-cable", "quantity": 3, "unit_price": PRICES["prod-cable"]},
    ]
    assert order["total_amount"] == 2 * PRICES["prod-mouse"] + 3 * PRICES["prod-cable"]
    assert order["created_at"] == order["updated_at"]
    parse_timestamp(order["created_at"])
    assert response.headers["X-Consistency-Token"] == f"{order['id']}@1"


async def test_create_order_writes_outbox_event(service: Service, auth_header: Headers) -> None:
    response = await place_order(service, auth_header())
    order = response.json()

    events = outbox_events(service.engine)
    assert len(events) == 1
    stream, event = events[0]
    assert stream == CQRS_STREAM
    assert event.type == "ztcqrs.order.created"
    assert event.subject == f"order/{order['id']}"
    assert event.source == "/cqrs/commands"
    assert event.origin == "cqrs"
    assert event.aggregate_version == 1
    assert event.data == order


async def test_create_order_rolls_back_with_outbox(service: Service, auth_header: Headers) -> None:
    # A trigger that fails every outbox insert shows that the order row shares its transaction.
    with service.engine.begin() as connection:
        connection.execute(text(
            "CREATE TRIGGER reject_outbox BEFORE INSERT ON outbox "
            "BEGIN SELECT RAISE(ABORT, 'outbox insert rejected by test'); END"
        ))
    response = await place_order(service, auth_header())

    assert response.status_code == 500
    assert response.json()["error"] == "internal_error"
    with service.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(orders)).scalar() == 0
        assert connection.execute(select(func.count()).select_from(outbox)).scalar() == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "items"),
        ({"items": []}, "items"),
        ({"items": [{"product_id": "prod-mouse", "quantity": 0}]}, "items.0.quantity"),
        ({"items": [{"product_id": "prod-mouse", "quantity": "2"}]}, "items.0.quantity"),
        ({"items": [{"product_id": "prod-mouse", "quantity": 1001}]}, "items.0.quantity"),
        ({"items": [{"product_id": "prod-mouse", "quantity": 1, "unit_price": 1}]},
         "items.0.unit_price"),
        ({"items": [{"product_id": "", "quantity": 1}]}, "items.0.product_id"),
        ({"items": [{"product_id": "prod-mouse", "quantity": 1},
                    {"product_id": "prod-unknown", "quantity": 1}]}, "items.1.product_id"),
        ({"items": [{"product_id": "prod-mouse", "quantity": 1},
                    {"product_id": "prod-mouse", "quantity": 1}]}, "items.1.product_id"),
    ],
)
async def test_create_order_invalid_body(
    service: Service, auth_header: Headers, body: dict[str, Any], field: str
) -> None:
    response = await service.client.post("/commands/orders", json=body, headers=auth_header())

    assert response.status_code == 422
    assert response.json()["error"] == "validation_failed"
    assert response.json()["field"] == field
    assert outbox_events(service.engine) == []


async def test_order_actions_follow_transitions(service: Service, auth_header: Headers) -> None:
    order = (await place_order(service, auth_header())).json()
    base = f"/commands/orders/{order['id']}"

    paid = await service.client.post(f"{base}/pay", headers=auth_header())
    assert paid.status_code == 200
    assert paid.json()["status"] == "paid"
    assert paid.json()["version"] == 2
    assert paid.json()["created_at"] == order["created_at"]
    assert paid.headers["X-Consistency-Token"] == f"{order['id']}@2"

    shipped = await service.client.post(f"{base}/ship", headers=auth_header())
    assert shipped.status_code == 200
    assert shipped.json()["status"] == "shipped"
    assert shipped.json()["version"] == 3

    rejected = await service.client.post(f"{base}/cancel", headers=auth_header())
    assert rejected.status_code == 409
    assert rejected.json()["error"] == "invalid_transition"

    events = [event for _stream, event in outbox_events(service.engine)]
    assert [event.type for event in events] == [
        "ztcqrs.order.created", "ztcqrs.order.paid", "ztcqrs.order.shipped",
    ]
    assert [event.aggregate_version for event in events] == [1, 2, 3]
    assert events[2].data == shipped.json()


async def test_order_cancel_from_pending(service: Service, auth_header: Headers) -> None:
    order = (await place_order(service, auth_header())).json()

    cancelled = await service.client.post(
        f"/commands/orders/{order['id']}/cancel", headers=auth_header()
    )
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"

    again = await service.client.post(f"/commands/orders/{order['id']}/pay", headers=auth_header())
    assert again.status_code == 409
    assert "cancelled" in again.json()["message"]


async def test_order_action_not_found_cases(service: Service, auth_header: Headers) -> None:
    order = (await place_order(service, auth_header("alice"))).json()
    cases = [
        (f"/commands/orders/{order['id']}/refund", "alice"),
        (f"/commands/orders/{order['id']}/pay", "bob"),
        ("/commands/orders/no-such-order/pay", "alice"),
    ]
    for path, user in cases:
        response = await service.client.post(path, headers=auth_header(user))
        assert response.status_code == 404, path
        assert response.json()["error"] == "not_found", path

    # Neither the foreign attempt nor the unknown action changed the order.
    assert len(outbox_events(service.engine)) == 1


async def test_commands_require_valid_token(service: Service, auth_header: Headers) -> None:
    missing = await service.client.post("/commands/orders", json={"items": []})
    assert missing.status_code == 401
    assert missing.json()["error"] == "invalid_token"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")

    stranger = SigningKey()
    forged = {"Authorization": f"Bearer {stranger.token('alice')}"}
    assert (await place_order(service, forged)).status_code == 401

    expired = auth_header("alice", lifetime=-60)
    assert (await place_order(service, expired)).status_code == 401


async def test_commands_require_write_scope(service: Service, auth_header: Headers) -> None:
    read_only = auth_header("alice", scope="orders:read products:read")

    response = await place_order(service, read_only)
    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"

    order = (await place_order(service, auth_header("alice"))).json()
    action = await service.client.post(f"/commands/orders/{order['id']}/pay", headers=read_only)
    assert action.status_code == 403
