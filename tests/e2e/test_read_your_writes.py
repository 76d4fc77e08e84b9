"""Read-your-writes across the split, on real processes: a write on one side, read at once on the
other side with the write's X-Consistency-Token, returns the written version.

Each read is sent as soon as the write returns, so it races the CDC path (monolith to CQRS) or the
reverse sync (CQRS to monolith). The reading side waits for the token's version, up to its
`read_wait_ms`.
"""

from typing import Any

import httpx

from .conftest import Platform

TOKEN_HEADER = "X-Consistency-Token"
CABLE = {"items": [{"product_id": "prod-cable", "quantity": 2}]}


def send(
    platform: Platform, service: str, method: str, path: str, headers: dict[str, str],
    token: str | None = None, body: Any = None,
) -> httpx.Response:
    all_headers = dict(headers)
    if token is not None:
        all_headers[TOKEN_HEADER] = token
    return httpx.request(
        method, f"{platform.url(service)}{path}", json=body, headers=all_headers, timeout=10
    )


def test_monolith_write_read_on_cqrs(platform: Platform, bob: dict[str, str]) -> None:
    created = send(platform, "monolith", "POST", "/orders", bob, body=CABLE)
    assert created.status_code == 201, created.text
    order_id = created.json()["id"]
    assert created.headers[TOKEN_HEADER] == f"{order_id}@1"

    read = send(
        platform, "cqrs", "GET", f"/queries/orders/{order_id}", bob,
        token=created.headers[TOKEN_HEADER],
    )
    assert read.status_code == 200, read.text
    assert read.json()["version"] == 1

    paid = send(platform, "monolith", "POST", f"/orders/{order_id}/pay", bob)
    assert paid.status_code == 200, paid.text
    token = paid.headers[TOKEN_HEADER]
    assert token == f"{order_id}@2"
    read_paid = send(platform, "cqrs", "GET", f"/queries/orders/{order_id}", bob, token=token)
    listed = send(platform, "cqrs", "GET", "/queries/orders", bob, token=token)

    assert read_paid.status_code == 200, read_paid.text
    assert read_paid.json()["version"] == 2
    assert read_paid.json()["status"] == "paid"
    versions = {order["id"]: order["version"] for order in listed.json()["orders"]}
    assert versions[order_id] == 2


def test_cqrs_write_read_on_monolith(platform: Platform, alice: dict[str, str]) -> None:
    created = send(platform, "cqrs", "POST", "/commands/orders", alice, body=CABLE)
    assert created.status_code == 201, created.text
    order_id = created.json()["id"]
    assert created.headers[TOKEN_HEADER] == f"{order_id}@1"

    read = send(
        platform, "monolith", "GET", f"/orders/{order_id}", alice,
        token=created.headers[TOKEN_HEADER],
    )
    assert read.status_code == 200, read.text
    assert read.json()["version"] == 1

    paid = send(platform, "cqrs", "POST", f"/commands/orders/{order_id}/pay", alice)
    assert paid.status_code == 200, paid.text
    token = paid.headers[TOKEN_HEADER]
    read_paid = send(platform, "monolith", "GET", f"/orders/{order_id}", alice, token=token)
    listed = send(platform, "monolith", "GET", "/orders", alice, token=token)

    assert read_paid.status_code == 200, read_paid.text
    assert read_paid.json()["version"] == 2
    assert read_paid.json()["status"] == "paid"
    versions = {order["id"]: order["version"] for order in listed.json()["orders"]}
    assert versions[order_id] == 2


def test_router_keeps_token_across_sides(
    platform: Platform, alice: dict[str, str], bob: dict[str, str]
) -> None:
    # The default rules send alice to the CQRS side and bob to the monolith.
    created = send(platform, "router", "POST", "/orders", alice, body=CABLE)
    assert created.headers["X-Gray-Target"] == "cqrs"
    order_id = created.json()["id"]

    read = send(
        platform, "monolith", "GET", f"/orders/{order_id}", alice,
        token=created.headers[TOKEN_HEADER],
    )

    assert created.headers[TOKEN_HEADER] == f"{order_id}@1"
    assert read.status_code == 200, read.text
    assert read.json()["version"] == 1
