"""One contract, run against the monolith and the CQRS service directly and through the router:
the same requests give the same status codes and body shapes whichever side serves them."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from .conftest import Platform

ORDER_KEYS = {
    "id",
    "user_id",
    "items",
    "total_amount",
    "status",
    "version",
    "created_at",
    "updated_at",
}
CQRS_PATHS = {
    ("POST", "/orders"): "/commands/orders",
    ("POST", "/orders/{id}/{action}"): "/commands/orders/{id}/{action}",
    ("GET", "/orders/{id}"): "/queries/orders/{id}",
    ("GET", "/orders"): "/queries/orders",
    ("GET", "/products"): "/queries/products",
}


@dataclass
class Target:
    name: str
    base_url: str
    cqrs_paths: bool
    user: str
    other_user: str

    def path(self, method: str, template: str, **values: str) -> str:
        mapped = CQRS_PATHS[(method, template)] if self.cqrs_paths else template
        return mapped.format(**values)


TARGETS: dict[str, Callable[[Platform], Target]] = {
    "monolith": lambda p: Target("monolith", p.url("monolith"), False, "bob", "alice"),
    "cqrs": lambda p: Target("cqrs", p.url("cqrs"), True, "alice", "bob"),
    "router-monolith": lambda p: Target("router-monolith", p.url("router"), False, "bob", "alice"),
    "router-cqrs": lambda p: Target("router-cqrs", p.url("router"), False, "alice", "bob"),
}


@pytest.fixture(params=sorted(TARGETS))
def target(request: pytest.FixtureRequest, platform: Platform) -> Target:
    return TARGETS[request.param](platform)


@pytest.fixture
def call(platform: Platform, target: Target) -> Callable[..., httpx.Response]:
    tokens = {user: platform.token(user) for user in (target.user, target.other_user)}

    def send(
        method: str,
        template: str,
        *,
        user: str | None = None,
        body: Any = None,
        token: str | None = None,
        consistency: str | None = None,
        raw: bytes | None = None,
        **values: str,
    ) -> httpx.Response:
        headers = {}
        if raw is not None:
            headers["Content-Type"] = "application/json"
        if consistency:
            headers["X-Consistency-Token"] = consistency
        bearer = token if token is not None else tokens[user or target.user]
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        url = target.base_url + target.path(method, template, **values)
        if raw is not None:
            response = httpx.request(method, url, content=raw, headers=headers, timeout=10)
        else:
            response = httpx.request(method, url, json=body, headers=headers, timeout=10)
        if target.name.startswith("router-") and bearer and user in (None, target.user):
            assert response.headers["X-Gray-Target"] == target.name.removeprefix("router-")
        return response

    return send


def new_order(call: Callable[..., httpx.Response], quantity: int = 2) -> dict[str, Any]:
    response = call(
        "POST",
        "/orders",
        body={
            "items": [
                {"product_id": "prod-mouse", "quantity": quantity},
                {"product_id": "prod-cable", "quantity": 1},
            ]
        },
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_create_prices_from_catalogue(call: Callable[..., httpx.Response], target: Target) -> None:
    order = new_order(call, quantity=3)
    assert set(order) == ORDER_KEYS
    assert order["user_id"] == target.user
    assert order["status"] == "pending"
    assert order["version"] == 1
    assert order["items"] == [
        {"product_id": "prod-mouse", "quantity": 3, "unit_price": 2900},
        {"product_id": "prod-cable", "quantity": 1, "unit_price": 990},
    ]
    assert order["total_amount"] == 3 * 2900 + 990


def test_get_and_list_own_orders(call: Callable[..., httpx.Response]) -> None:
    created = call("POST", "/orders", body={"items": [{"product_id": "prod-stand", "quantity": 1}]})
    assert created.status_code == 201
    order = created.json()
    fetched = call("GET", "/orders/{id}", id=order["id"])
    assert fetched.status_code == 200
    assert fetched.json() == order
    # A list reflects one's own write when the read carries the write's consistency token, which
    # both sides send with every order write.
    assert "X-Consistency-Token" in created.headers
    listed = call("GET", "/orders", consistency=created.headers.get("X-Consistency-Token"))
    assert listed.status_code == 200
    assert order["id"] in [item["id"] for item in listed.json()["orders"]]


def test_other_users_order_not_found(call: Callable[..., httpx.Response], target: Target) -> None:
    order = new_order(call)
    response = call("GET", "/orders/{id}", user=target.other_user, id=order["id"])
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_lifecycle_and_transitions(call: Callable[..., httpx.Response]) -> None:
    order = new_order(call)
    paid = call("POST", "/orders/{id}/{action}", id=order["id"], action="pay")
    assert paid.status_code == 200
    assert paid.json()["status"] == "paid"
    assert paid.json()["version"] == 2

    again = call("POST", "/orders/{id}/{action}", id=order["id"], action="pay")
    assert again.status_code == 409
    assert again.json()["error"] == "invalid_transition"

    shipped = call("POST", "/orders/{id}/{action}", id=order["id"], action="ship")
    assert shipped.status_code == 200
    assert shipped.json()["status"] == "shipped"
    assert shipped.json()["version"] == 3

    cancel = call("POST", "/orders/{id}/{action}", id=order["id"], action="cancel")
    assert cancel.status_code == 409

    unknown = call("POST", "/orders/{id}/{action}", id=order["id"], action="refund")
    assert unknown.status_code == 404


BAD_BODIES = [
    ({"items": [{"product_id": "prod-mouse", "quantity": 0}]}, "items.0.quantity"),
    ({"items": [{"product_id": "prod-mouse", "quantity": "many"}]}, "items.0.quantity"),
    ({"items": [{"product_id": "no-such-product", "quantity": 1}]}, "items.0.product_id"),
    ({"items": []}, "items"),
    ({}, "items"),
    (
        {"items": [{"product_id": "prod-mouse", "quantity": 1, "unit_price": 1}]},
        "items.0.unit_price",
    ),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
def test_bad_input_names_field(call: Callable[..., httpx.Response], body: Any, field: str) -> None:
    response = call("POST", "/orders", body=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_failed"
    assert response.json()["field"] == field


def test_missing_order_not_found(call: Callable[..., httpx.Response]) -> None:
    response = call("GET", "/orders/{id}", id="0" * 32)
    assert response.status_code == 404


def test_no_token_unauthorized(call: Callable[..., httpx.Response]) -> None:
    response = call("GET", "/orders", token="")
    assert response.status_code == 401


def test_products_listed(call: Callable[..., httpx.Response]) -> None:
    response = call("GET", "/products")
    assert response.status_code == 200
    ids = {product["id"] for product in response.json()["products"]}
    assert {"prod-keyboard", "prod-mouse", "prod-cable"} <= ids



@pytest.mark.parametrize(
    ("raw", "hint"),
    [(b'{"items": [', "not valid JSON"), (b'"an order"', "must be a JSON object")],
)
def test_malformed_body_names_body(
    call: Callable[..., httpx.Response], raw: bytes, hint: str
) -> None:
    response = call("POST", "/orders", raw=raw)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "body"
    assert hint in response.json()["message"]
