"""The monolith's public API over HTTP, against a real SQLite file and real RS256 tokens."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.monolith.app import create_app
from services.monolith.settings import Settings
from services.shared.clock import parse_timestamp
from services.shared.domain import DEMO_PRODUCTS
from services.shared.security import StaticKeySource
from tests.conftest import TEST_ISSUER, SigningKey, free_port

Headers = Callable[..., dict[str, str]]
PRICES = {product["id"]: product["price"] for product in DEMO_PRODUCTS}
MOUSE = {"product_id": "prod-mouse", "quantity": 1}


def monolith_settings(data_dir: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=data_dir, token_issuer=TEST_ISSUER, **overrides)


@pytest.fixture
def client(data_dir: Path, signing_key: SigningKey) -> Iterator[TestClient]:
    app = create_app(monolith_settings(data_dir), key_source=StaticKeySource(signing_key.jwks))
    with TestClient(app) as test_client:
        yield test_client


def place_order(client: TestClient, headers: dict[str, str], items: list[dict[str, Any]]) -> Any:
    return client.post("/orders", json={"items": items}, headers=headers)


def test_create_order_prices_from_catalogue(client: TestClient, auth_header: Headers) -> None:
    items = [
        {"product_id": "prod-mouse", "quantity": 2},
        {"product_id": "prod-cable", "quantity": 3},
    ]
    response = place_order(client, auth_header("alice"), items)

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


def test_create_order_rejects_unit_price(client: TestClient, auth_header: Headers) -> None:
    items = [{"product_id": "prod-mouse", "quantity": 1, "unit_price": 1}]
    response = place_order(client, auth_header(), items)

    assert response.status_code == 422
    assert response.json()["field"] == "items.0.unit_price"


def test_create_order_invalid_items(client: TestClient, auth_header: Headers) -> None:
    cases = [
        ([], "items"),
        ([{"product_id": "prod-mouse", "quantity": 0}], "items.0.quantity"),
        ([{"product_id": "prod-mouse", "quantity": "2"}], "items.0.quantity"),
        ([{"product_id": "prod-mouse", "quantity": 1001}], "items.0.quantity"),
        ([{"quantity": 1}], "items.0.product_id"),
        (
            [MOUSE, {"product_id": "nope", "quantity": 1}],
            "items.1.product_id",
        ),
        (
            [MOUSE, MOUSE],
            "items.1.product_id",
        ),
    ]
    for items, field in cases:
        response = place_order(client, auth_header(), items)
        assert response.status_code == 422, items
        body = response.json()
        assert body["error"] == "validation_failed", items
        assert body["field"] == field, items
        assert body["message"], items

    assert client.get("/orders", headers=auth_header()).json() == {"orders": []}


def test_create_order_body_not_json(client: TestClient, auth_header: Headers) -> None:
    response = client.post(
        "/orders", content=b"items", headers={**auth_header(), "Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert response.json()["error"] == "validation_failed"


def test_get_order_owner_only(client: TestClient, auth_header: Headers) -> None:
    order = place_order(client, auth_header("alice"), [{"product_id": "prod-stand", "quantity": 1}])
    order_id = order.json()["id"]

    own = client.get(f"/orders/{order_id}", headers=auth_header("alice"))
    other = client.get(f"/orders/{order_id}", headers=auth_header("bob"))
    missing = client.get("/orders/does-not-exist", headers=auth_header("alice"))

    assert own.status_code == 200
    assert own.json() == order.json()
    assert other.status_code == 404
    assert other.json()["error"] == "not_found"
    assert missing.status_code == 404
    assert other.json()["message"].replace(order_id, "X") == missing.json()["message"].replace(
        "does-not-exist", "X"
    )


def test_list_orders_newest_first(client: TestClient, auth_header: Headers) -> None:
    first = place_order(client, auth_header("alice"), [MOUSE])
    cable = {"product_id": "prod-cable", "quantity": 1}
    second = place_order(client, auth_header("alice"), [cable])
    place_order(client, auth_header("bob"), [{"product_id": "prod-stand", "quantity": 1}])

    alice = client.get("/orders", headers=auth_header("alice"))

    assert alice.status_code == 200
    ids = [order["id"] for order in alice.json()["orders"]]
    assert ids == [second.json()["id"], first.json()["id"]]
    bob = client.get("/orders", headers=auth_header("bob")).json()["orders"]
    assert [order["user_id"] for order in bob] == ["bob"]


def test_order_actions_follow_transitions(client: TestClient, auth_header: Headers) -> None:
    monitor = {"product_id": "prod-monitor", "quantity": 1}
    order = place_order(client, auth_header(), [monitor]).json()
    order_id = order["id"]

    paid = client.post(f"/orders/{order_id}/pay", headers=auth_header())
    assert paid.status_code == 200
    assert paid.json()["status"] == "paid"
    assert paid.json()["version"] == 2
    assert paid.json()["updated_at"] >= order["updated_at"]
    assert paid.json()["created_at"] == order["created_at"]

    shipped = client.post(f"/orders/{order_id}/ship", headers=auth_header())
    assert shipped.status_code == 200
    assert shipped.json()["status"] == "shipped"
    assert shipped.json()["version"] == 3

    cancelled = client.post(f"/orders/{order_id}/cancel", headers=auth_header())
    assert cancelled.status_code == 409
    assert cancelled.json()["error"] == "invalid_transition"
    assert "shipped" in cancelled.json()["message"]

    stored = client.get(f"/orders/{order_id}", headers=auth_header()).json()
    assert stored == shipped.json()


def test_order_cancel_from_pending(client: TestClient, auth_header: Headers) -> None:
    order_id = place_order(client, auth_header(), [MOUSE]).json()["id"]

    cancelled = client.post(f"/orders/{order_id}/cancel", headers=auth_header())
    paid = client.post(f"/orders/{order_id}/pay", headers=auth_header())

    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["version"] == 2
    assert paid.status_code == 409


def test_order_action_errors(client: TestClient, auth_header: Headers) -> None:
    order_id = place_order(client, auth_header(), [MOUSE]).json()["id"]

    unknown_action = client.post(f"/orders/{order_id}/refund", headers=auth_header())
    other_user = client.post(f"/orders/{order_id}/pay", headers=auth_header("bob"))
    missing = client.post("/orders/nope/pay", headers=auth_header())
    early_ship = client.post(f"/orders/{order_id}/ship", headers=auth_header())

    assert unknown_action.status_code == 404
    assert "refund" in unknown_action.json()["message"]
    assert other_user.status_code == 404
    assert missing.status_code == 404
    assert early_ship.status_code == 409
    stored = client.get(f"/orders/{order_id}", headers=auth_header()).json()
    assert stored["status"] == "pending"
    assert stored["version"] == 1


def test_auth_missing_or_invalid_token(
    client: TestClient, auth_header: Headers, signing_key: SigningKey
) -> None:
    no_token = client.get("/orders")
    expired = client.get("/orders", headers=auth_header(lifetime=-60))
    other_key = SigningKey(kid=signing_key.kid)
    forged = client.get("/orders", headers={"Authorization": f"Bearer {other_key.token()}"})

    for response in (no_token, expired, forged):
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_token"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_auth_missing_scope(client: TestClient, auth_header: Headers) -> None:
    read_only = auth_header(scope="orders:read products:read")
    no_products = auth_header(scope="orders:read orders:write")

    create = place_order(client, read_only, [{"product_id": "prod-mouse", "quantity": 1}])
    listing = client.get("/orders", headers=auth_header(scope="products:read"))
    products = client.get("/products", headers=no_products)

    for response in (create, listing, products):
        assert response.status_code == 403
        assert response.json()["error"] == "insufficient_scope"
    assert client.get("/orders", headers=read_only).status_code == 200


def test_products_list_and_get(client: TestClient, auth_header: Headers) -> None:
    listing = client.get("/products", headers=auth_header())
    one = client.get("/products/prod-keyboard", headers=auth_header())
    missing = client.get("/products/prod-none", headers=auth_header())

    assert listing.status_code == 200
    products = listing.json()["products"]
    assert {product["id"]: product["price"] for product in products} == PRICES
    assert all(product["version"] == 1 for product in products)
    assert one.status_code == 200
    assert one.json()["name"] == "Mechanical keyboard"
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"


def test_production_seeds_nothing(
    data_dir: Path, signing_key: SigningKey, auth_header: Headers
) -> None:
    settings = monolith_settings(data_dir, env="production")
    app = create_app(settings, key_source=StaticKeySource(signing_key.jwks))

    with TestClient(app) as client:
        response = client.get("/products", headers=auth_header())

    assert response.json() == {"products": []}


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


def test_readiness_without_jwks(data_dir: Path) -> None:
    jwks_url = f"http://127.0.0.1:{free_port()}/jwks.json"  # nothing listens there
    settings = monolith_settings(data_dir, jwks_url=jwks_url)
    app = create_app(settings)

    with TestClient(app) as client:
        ready = client.get("/readyz")

    assert ready.status_code == 503
    assert "jwks" in ready.json()["failures"]
