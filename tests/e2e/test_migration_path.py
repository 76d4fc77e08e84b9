"""The migration path through the router, on real processes: routing, replication both ways without
echo, catch-up after a worker outage, and rules reloaded while the router runs."""

import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from services.shared.clock import parse_timestamp

from .conftest import LocalStack, Platform, wait_for

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
KEYBOARD = {"items": [{"product_id": "prod-keyboard", "quantity": 1}]}
# Requests in a row, each on a new connection, that must all take the same route before every
# router process counts as having reloaded. New connections spread over the processes that share
# the listening socket, so a row this long reaches each of them.
ROUTER_AGREEMENT_REQUESTS = 20


def create_order(platform: Platform, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{platform.url('router')}/orders", json=KEYBOARD, headers=headers, timeout=10
    )


def stream_entries(platform: Platform, stream: str, subject: str) -> list[dict[str, Any]]:
    with platform.redis() as client:
        return [fields for _, fields in client.xrange(stream) if fields.get("subject") == subject]


def change_log_rows(platform: LocalStack, order_id: str) -> list[tuple[str, str, int]]:
    with sqlite3.connect(platform.data_dir / "monolith.db") as connection:
        return connection.execute(
            "SELECT op, origin, version FROM change_log WHERE table_name = 'orders' AND row_id = ?",
            (order_id,),
        ).fetchall()


def monolith_order(platform: Platform, order_id: str, headers: dict[str, str]) -> Any:
    response = httpx.get(
        f"{platform.url('monolith')}/orders/{order_id}", headers=headers, timeout=5
    )
    return response.json() if response.status_code == 200 else None


def read_model_order(platform: Platform, order_id: str) -> Any:
    with platform.redis() as client:
        return client.hgetall(f"rm:order:{order_id}") or None


def replace_rules(path: Path, text: str) -> None:
    """Write the rules file the way editors do: a new file renamed over the old one."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".rules-", suffix=".yaml")
    with os.fdopen(descriptor, "w") as stream:
        stream.write(text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def test_beta_tester_served_by_cqrs(platform: Platform, alice: dict[str, str]) -> None:
    created = create_order(platform, alice)
    assert created.status_code == 201, created.text
    assert created.headers["X-Gray-Target"] == "cqrs"
    assert created.headers["X-Gray-Rule"] == "beta-testers"
    assert created.headers["X-Request-ID"]
    order = created.json()
    assert set(order) == ORDER_KEYS
    assert order["user_id"] == "alice"
    assert order["total_amount"] == 8900

    fetched = httpx.get(f"{platform.url('router')}/orders/{order['id']}", headers=alice, timeout=5)
    assert fetched.status_code == 200
    assert fetched.headers["X-Gray-Target"] == "cqrs"
    assert fetched.json() == order


def test_regular_user_served_by_monolith(platform: Platform, bob: dict[str, str]) -> None:
    created = create_order(platform, bob)
    assert created.status_code == 201, created.text
    assert created.headers["X-Gray-Target"] == "monolith"
    order = created.json()
    assert set(order) == ORDER_KEYS
    assert order["user_id"] == "bob"

    fetched = httpx.get(f"{platform.url('router')}/orders/{order['id']}", headers=bob, timeout=5)
    assert fetched.status_code == 200
    assert fetched.headers["X-Gray-Target"] == "monolith"
    assert fetched.json() == order


def test_monolith_order_reaches_cqrs_once(platform: Platform, bob: dict[str, str]) -> None:
    order = create_order(platform, bob).json()

    projected = wait_for(
        lambda: read_model_order(platform, order["id"]),
        what="the monolith order in the CQRS read model",
    )
    assert int(projected["version"]) == 1
    direct = httpx.get(
        f"{platform.url('cqrs')}/queries/orders/{order['id']}", headers=bob, timeout=5
    )
    assert direct.json() == order

    time.sleep(0.5)  # room for an echo to appear, if there were one
    assert len(stream_entries(platform, "cdc.monolith", f"order/{order['id']}")) == 1
    assert stream_entries(platform, "events.cqrs", f"order/{order['id']}") == []


def test_cqrs_order_reaches_monolith_once(platform: Platform, alice: dict[str, str]) -> None:
    order = create_order(platform, alice).json()

    copied = wait_for(
        lambda: monolith_order(platform, order["id"], alice), what="the CQRS order in the monolith"
    )
    assert copied == order

    time.sleep(0.5)
    assert len(stream_entries(platform, "events.cqrs", f"order/{order['id']}")) == 1
    assert stream_entries(platform, "cdc.monolith", f"order/{order['id']}") == []


def test_change_log_records_origin(
    local_platform: LocalStack, alice: dict[str, str], bob: dict[str, str]
) -> None:
    monolith_side = create_order(local_platform, bob).json()
    cqrs_side = create_order(local_platform, alice).json()
    wait_for(
        lambda: monolith_order(local_platform, cqrs_side["id"], alice),
        what="the CQRS order in the monolith",
    )

    time.sleep(0.5)  # room for an echo to appear, if there were one
    assert change_log_rows(local_platform, monolith_side["id"]) == [("insert", "monolith", 1)]
    assert change_log_rows(local_platform, cqrs_side["id"]) == [("insert", "cqrs", 1)]


def test_state_change_syncs_both_ways(
    platform: Platform, alice: dict[str, str], bob: dict[str, str]
) -> None:
    router = platform.url("router")
    alice_order = create_order(platform, alice).json()
    paid = httpx.post(f"{router}/orders/{alice_order['id']}/pay", headers=alice, timeout=5)
    assert paid.status_code == 200
    assert paid.json()["version"] == 2
    wait_for(
        lambda: (monolith_order(platform, alice_order["id"], alice) or {}).get("status") == "paid",
        what="the payment to reach the monolith",
    )

    bob_order = create_order(platform, bob).json()
    cancelled = httpx.post(f"{router}/orders/{bob_order['id']}/cancel", headers=bob, timeout=5)
    assert cancelled.status_code == 200
    wait_for(
        lambda: (read_model_order(platform, bob_order["id"]) or {}).get("version") == "2",
        what="the cancellation to reach the read model",
    )


def test_workers_catch_up_after_outage(local_platform: LocalStack, bob: dict[str, str]) -> None:
    workers = ("cdc-ingest", "projector")
    for name in workers:
        local_platform.runner.stop_process(name)
    try:
        order = create_order(local_platform, bob).json()
        wait_for(
            lambda: stream_entries(local_platform, "cdc.monolith", f"order/{order['id']}"),
            what="the order on cdc.monolith",
        )
        time.sleep(0.3)
        assert read_model_order(local_platform, order["id"]) is None
    finally:
        for name in workers:
            local_platform.runner.start_process(name)
    wait_for(
        lambda: read_model_order(local_platform, order["id"]),
        what="the order appended during the outage to be projected",
    )


def test_rules_reload_changes_routing(platform: Platform, bob: dict[str, str]) -> None:
    rules_file = platform.rules_file
    original = rules_file.read_text()
    rules = yaml.safe_load(original)
    canary = next(rule for rule in rules["rules"] if rule["name"] == "canary")
    canary["split"]["percent"] = 100
    admin = {"Authorization": f"Bearer {platform.client_token('ztcqrs-admin', 'dev-admin-secret')}"}

    def gray_status() -> Any:
        return httpx.get(f"{platform.url('router')}/_gray/status", headers=admin, timeout=5).json()

    def all_routed_to(target: str) -> bool:
        # The router may run several processes, each reloading the file on its own; a request
        # on a new connection may reach any of them, so every one of a row of requests must agree.
        return all(
            create_order(platform, bob).headers.get("X-Gray-Target") == target
            for _ in range(ROUTER_AGREEMENT_REQUESTS)
        )

    try:
        replace_rules(rules_file, yaml.safe_dump(rules))
        wait_for(
            lambda: all_routed_to("cqrs"),
            what="bob to move to the CQRS side after the percentage change",
        )

        # last_error keeps each process's latest failure, so a new one shows as a later time.
        written_at = time.time()
        replace_rules(rules_file, "rules: [this is not a rule\n")

        def rejected_by_every_process() -> bool:
            for _ in range(ROUTER_AGREEMENT_REQUESTS):
                failed_at = gray_status()["last_error_at"]
                if failed_at is None or parse_timestamp(failed_at).timestamp() < written_at:
                    return False
            return True

        wait_for(rejected_by_every_process, what="every router process to reject the bad rules")
        response = create_order(platform, bob)
        assert response.headers["X-Gray-Target"] == "cqrs"
        assert response.headers["X-Gray-Rule"] == "canary"
        assert gray_status()["last_error"]
    finally:
        replace_rules(rules_file, original)
    wait_for(lambda: all_routed_to("monolith"), what="bob to return to the monolith")
