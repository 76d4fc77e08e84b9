"""The monolith's internal sync API, with real service and user tokens and a real SQLite file."""

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from services.monolith.app import create_app
from services.monolith.settings import Settings
from services.monolith.workers.cdc_relay import read_checkpoint, relay_once
from services.shared.events import Event
from services.shared.names import CDC_STREAM
from services.shared.security import StaticKeySource
from services.shared.streams import connect
from tests.conftest import TEST_ISSUER, SigningKey

Headers = Callable[..., dict[str, str]]
SYNC_CLIENT = "cqrs-reverse-sync"


def make_client(data_dir: Path, signing_key: SigningKey, **overrides: Any) -> TestClient:
    settings = Settings(data_dir=data_dir, token_issuer=TEST_ISSUER, **overrides)
    return TestClient(create_app(settings, key_source=StaticKeySource(signing_key.jwks)))


@pytest.fixture
def client(data_dir: Path, signing_key: SigningKey) -> Iterator[TestClient]:
    with make_client(data_dir, signing_key, phase="canary") as test_client:
        yield test_client


@pytest.fixture
def service_header(signing_key: SigningKey) -> dict[str, str]:
    token = signing_key.token(SYNC_CLIENT, scope="sync:write", client_id=SYNC_CLIENT)
    return {"Authorization": f"Bearer {token}"}


def engine_of(client: TestClient) -> Engine:
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]
    return engine


def order_state(
    order_id: str = "o-1", *, version: int = 1, status: str = "pending"
) -> dict[str, Any]:
    return {
        "id": order_id,
        "user_id": "alice",
        "items": [{"product_id": "prod-mouse", "quantity": 2, "unit_price": 2900}],
        "total_amount": 5800,
        "status": status,
        "version": version,
        "created_at": "2030-01-01T00:00:00.000000Z",
        "updated_at": "2030-01-01T00:00:00.000000Z",
    }


def sync(client: TestClient, headers: dict[str, str], state: dict[str, Any],
         event_id: str = "event-1") -> Any:
    return client.put(
        f"/internal/sync/orders/{state['id']}",
        json={"state": state, "event_id": event_id},
        headers=headers,
    )


def rows(engine: Engine, query: str) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [dict(row) for row in connection.execute(text(query)).mappings()]


def test_sync_applies_new_order(
    client: TestClient, service_header: dict[str, str], auth_header: Headers
) -> None:
    state = order_state(version=3, status="paid")

    response = sync(client, service_header, state)

    assert response.status_code == 200
    assert response.json() == {"decision": "apply", "version": 3}
    stored = client.get("/orders/o-1", headers=auth_header("alice"))
    assert stored.json() == state
    log = rows(engine_of(client), "SELECT * FROM change_log WHERE table_name = 'orders'")
    assert len(log) == 1
    assert log[0]["origin"] == "cqrs"
    assert log[0]["op"] == "insert"
    assert log[0]["version"] == 3
    assert json.loads(log[0]["row_json"]) == state
    assert rows(engine_of(client), "SELECT * FROM sync_context") == []


def test_sync_applies_newer_version(
    client: TestClient, service_header: dict[str, str], auth_header: Headers
) -> None:
    sync(client, service_header, order_state(version=1))

    response = sync(client, service_header, order_state(version=2, status="paid"), "event-2")

    assert response.json() == {"decision": "apply", "version": 2}
    stored = client.get("/orders/o-1", headers=auth_header()).json()
    assert stored["status"] == "paid"
    assert stored["version"] == 2
    log = rows(engine_of(client), "SELECT op, version, origin FROM change_log WHERE row_id = 'o-1'")
    assert log == [
        {"op": "insert", "version": 1, "origin": "cqrs"},
        {"op": "update", "version": 2, "origin": "cqrs"},
    ]


def test_sync_skips_stale_and_duplicate(
    client: TestClient, service_header: dict[str, str], auth_header: Headers
) -> None:
    current = order_state(version=2, status="paid")
    sync(client, service_header, current)

    stale = sync(client, service_header, order_state(version=1), "event-old")
    duplicate = sync(client, service_header, current, "event-again")

    assert stale.status_code == 200
    assert stale.json() == {"decision": "stale", "version": 2}
    assert duplicate.json() == {"decision": "duplicate", "version": 2}
    assert client.get("/orders/o-1", headers=auth_header()).json() == current
    assert len(rows(engine_of(client), "SELECT * FROM change_log WHERE row_id = 'o-1'")) == 1
    assert rows(engine_of(client), "SELECT * FROM conflicts") == []


def test_sync_conflict_canary_keeps_local(
    client: TestClient, service_header: dict[str, str], auth_header: Headers
) -> None:
    created = client.post(
        "/orders", json={"items": [{"product_id": "prod-mouse", "quantity": 2}]},
        headers=auth_header(),
    ).json()
    local = client.post(f"/orders/{created['id']}/pay", headers=auth_header()).json()
    incoming = {**local, "status": "cancelled", "updated_at": "2030-01-01T00:00:00.000000Z"}

    response = sync(client, service_header, incoming)

    assert response.json() == {"decision": "conflict_keep", "version": local["version"]}
    assert client.get(f"/orders/{local['id']}", headers=auth_header()).json() == local
    recorded = rows(engine_of(client), "SELECT * FROM conflicts")
    assert len(recorded) == 1
    assert recorded[0]["aggregate"] == "order"
    assert recorded[0]["aggregate_id"] == local["id"]
    assert recorded[0]["version"] == local["version"]
    assert recorded[0]["resolution"] == "conflict_keep"
    assert recorded[0]["incoming_origin"] == "cqrs"
    assert json.loads(recorded[0]["local_json"]) == local
    assert json.loads(recorded[0]["incoming_json"]) == incoming


def test_sync_conflict_cutover_applies_equal_version(
    data_dir: Path, signing_key: SigningKey, service_header: dict[str, str], auth_header: Headers
) -> None:
    with make_client(data_dir, signing_key, phase="cutover") as client:
        sync(client, service_header, order_state(version=2, status="paid"))
        incoming = order_state(version=2, status="cancelled")

        response = sync(client, service_header, incoming, "event-2")

        assert response.json() == {"decision": "conflict_apply", "version": 2}
        assert client.get("/orders/o-1", headers=auth_header()).json() == incoming
        log = rows(engine_of(client), "SELECT version, origin FROM change_log WHERE row_id = 'o-1'")
        assert log == [{"version": 2, "origin": "cqrs"}, {"version": 2, "origin": "cqrs"}]
        recorded = rows(engine_of(client), "SELECT resolution FROM conflicts")
        assert recorded == [{"resolution": "conflict_apply"}]


def test_sync_rejects_wrong_callers(
    client: TestClient, signing_key: SigningKey, auth_header: Headers
) -> None:
    state = order_state()
    user_with_scope = auth_header("alice", scope="sync:write orders:write", client_id=SYNC_CLIENT)
    other_client = signing_key.token("ztcqrs-admin", scope="sync:write", client_id="ztcqrs-admin")
    no_scope = signing_key.token(SYNC_CLIENT, scope="gray:admin", client_id=SYNC_CLIENT)

    cases = [
        (user_with_scope, 403),
        ({"Authorization": f"Bearer {other_client}"}, 403),
        ({"Authorization": f"Bearer {no_scope}"}, 403),
        ({}, 401),
    ]
    for headers, status in cases:
        response = sync(client, headers, state)
        assert response.status_code == status, headers

    invalid_body = client.put(
        "/internal/sync/orders/o-1", json={"state": {}}, headers=user_with_scope
    )
    assert invalid_body.status_code == 403
    assert rows(engine_of(client), "SELECT * FROM orders") == []


def test_sync_client_ids_setting(
    data_dir: Path, signing_key: SigningKey, service_header: dict[str, str]
) -> None:
    with make_client(data_dir, signing_key, sync_client_ids=["other-sync"]) as client:
        refused = sync(client, service_header, order_state())

    assert refused.status_code == 403
    assert SYNC_CLIENT in refused.json()["message"]


def test_sync_validates_state(client: TestClient, service_header: dict[str, str]) -> None:
    mismatch = client.put(
        "/internal/sync/orders/o-2",
        json={"state": order_state("o-1"), "event_id": "event-1"},
        headers=service_header,
    )
    missing_total = order_state()
    del missing_total["total_amount"]
    incomplete = sync(client, service_header, missing_total)
    no_event = client.put(
        "/internal/sync/orders/o-1", json={"state": order_state()}, headers=service_header
    )

    assert mismatch.status_code == 422
    assert mismatch.json()["field"] == "state.id"
    assert incomplete.status_code == 422
    assert incomplete.json()["field"] == "state.total_amount"
    assert no_event.status_code == 422
    assert no_event.json()["field"] == "event_id"
    assert rows(engine_of(client), "SELECT * FROM orders") == []


def test_sync_writes_not_relayed(
    client: TestClient, service_header: dict[str, str], auth_header: Headers, redis_url: str
) -> None:
    sync(client, service_header, order_state("o-synced"))
    client.post(
        "/orders", json={"items": [{"product_id": "prod-mouse", "quantity": 1}]},
        headers=auth_header(),
    )
    engine = engine_of(client)
    last_seq = rows(engine, "SELECT MAX(seq) AS seq FROM change_log")[0]["seq"]

    async def relay() -> int:
        redis_client = connect(redis_url)
        try:
            return await relay_once(engine, redis_client, batch_size=100)
        finally:
            await redis_client.aclose()

    relayed = asyncio.run(relay())

    assert relayed == last_seq
    assert read_checkpoint(engine) == last_seq
    with redis.Redis.from_url(redis_url, decode_responses=True) as reader:
        entries = reader.xrange(CDC_STREAM)
    events = [Event.from_fields(fields) for _entry_id, fields in entries]
    assert len(events) == last_seq - 1
    assert "order/o-synced" not in {event.subject for event in events}
    assert {event.origin for event in events} == {"monolith"}
