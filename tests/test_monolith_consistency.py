"""Read-your-writes on the monolith: writes return X-Consistency-Token, and reads that send it back
wait, up to `read_wait_ms`, until the SQLite file contains the order at that version.

A thread writes the row the way the reverse sync does, while a read waits for it.
"""

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from services.monolith import store
from services.monolith.app import create_app
from services.shared.clock import utc_now
from services.shared.domain import OrderPublic, OrderStatus
from services.shared.security import StaticKeySource
from tests.conftest import SigningKey
from tests.test_monolith_api import MOUSE, monolith_settings

Headers = Callable[..., dict[str, str]]
TOKEN_HEADER = "X-Consistency-Token"
# Far longer than the delayed writes, so the write ends each wait, not the bound.
LONG_WAIT_MS = 20_000
SHORT_WAIT_MS = 50


@pytest.fixture
def client(data_dir: Path, signing_key: SigningKey) -> Iterator[TestClient]:
    settings = monolith_settings(data_dir, read_wait_ms=LONG_WAIT_MS)
    app = create_app(settings, key_source=StaticKeySource(signing_key.jwks))
    with TestClient(app) as test_client:
        yield test_client


def engine_of(client: TestClient) -> Engine:
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]
    return engine


def write_later(engine: Engine, order: OrderPublic, delay_seconds: float = 0.3) -> threading.Timer:
    """Upsert `order` after `delay_seconds` from another thread, as the reverse sync would."""

    def write() -> None:
        with engine.begin() as connection:
            store.upsert_order(connection, order)

    timer = threading.Timer(delay_seconds, write)
    timer.start()
    return timer


def new_order(user_id: str, version: int, **fields: Any) -> OrderPublic:
    now = utc_now()
    values: dict[str, Any] = {
        "id": "f" * 32, "user_id": user_id,
        "items": [{"product_id": "prod-mouse", "quantity": 1, "unit_price": 2900}],
        "total_amount": 2900, "status": "pending", "version": version,
        "created_at": now, "updated_at": now, **fields,
    }
    return OrderPublic.model_validate(values)


def test_writes_return_consistency_token(client: TestClient, auth_header: Headers) -> None:
    created = client.post("/orders", json={"items": [MOUSE]}, headers=auth_header())
    order_id = created.json()["id"]
    paid = client.post(f"/orders/{order_id}/pay", headers=auth_header())

    assert created.headers[TOKEN_HEADER] == f"{order_id}@1"
    assert paid.headers[TOKEN_HEADER] == f"{order_id}@2"


def test_read_with_held_version_answers(client: TestClient, auth_header: Headers) -> None:
    created = client.post("/orders", json={"items": [MOUSE]}, headers=auth_header())
    token = created.headers[TOKEN_HEADER]

    response = client.get(
        f"/orders/{created.json()['id']}", headers={**auth_header(), TOKEN_HEADER: token}
    )

    assert response.status_code == 200
    assert response.json() == created.json()


def test_read_waits_for_newer_version(client: TestClient, auth_header: Headers) -> None:
    created = client.post("/orders", json={"items": [MOUSE]}, headers=auth_header())
    order = OrderPublic.model_validate(created.json())
    paid = order.model_copy(update={"status": OrderStatus.PAID, "version": 2})
    timer = write_later(engine_of(client), paid)

    response = client.get(
        f"/orders/{order.id}", headers={**auth_header(), TOKEN_HEADER: f"{order.id}@2"}
    )
    timer.join()

    assert response.status_code == 200
    assert response.json()["version"] == 2
    assert response.json()["status"] == "paid"


def test_read_waits_for_missing_order(client: TestClient, auth_header: Headers) -> None:
    order = new_order("alice", 1)
    timer = write_later(engine_of(client), order)

    response = client.get(
        f"/orders/{order.id}", headers={**auth_header(), TOKEN_HEADER: f"{order.id}@1"}
    )
    timer.join()

    assert response.status_code == 200
    assert response.json()["id"] == order.id


def test_list_waits_for_token_order(client: TestClient, auth_header: Headers) -> None:
    order = new_order("alice", 1)
    timer = write_later(engine_of(client), order)

    response = client.get("/orders", headers={**auth_header(), TOKEN_HEADER: f"{order.id}@1"})
    timer.join()

    assert response.status_code == 200
    assert [item["id"] for item in response.json()["orders"]] == [order.id]


def test_read_after_bound_answers_held_state(
    data_dir: Path, signing_key: SigningKey, auth_header: Headers
) -> None:
    settings = monolith_settings(data_dir, read_wait_ms=SHORT_WAIT_MS)
    app = create_app(settings, key_source=StaticKeySource(signing_key.jwks))
    with TestClient(app) as client:
        created = client.post("/orders", json={"items": [MOUSE]}, headers=auth_header())
        order_id = created.json()["id"]

        ahead = client.get(
            f"/orders/{order_id}", headers={**auth_header(), TOKEN_HEADER: f"{order_id}@5"}
        )
        missing = client.get(
            f"/orders/{'e' * 32}", headers={**auth_header(), TOKEN_HEADER: f"{'e' * 32}@1"}
        )

    assert ahead.status_code == 200
    assert ahead.json()["version"] == 1
    assert missing.status_code == 404


def test_read_malformed_token_ignored(client: TestClient, auth_header: Headers) -> None:
    created = client.post("/orders", json={"items": [MOUSE]}, headers=auth_header())
    order_id = created.json()["id"]

    for token in ("no-version", f"{order_id}@x", "@3"):
        response = client.get(f"/orders/{order_id}", headers={**auth_header(), TOKEN_HEADER: token})
        assert response.status_code == 200, token
