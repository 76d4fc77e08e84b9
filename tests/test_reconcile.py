"""`ztcqrs reconcile` against the whole platform as real processes: drift made behind the platform's
back is reported by id and repaired, work in flight is not drift, and the result reaches
`reconcile:last`, the metrics and `ztcqrs conflicts`."""

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from services.shared.names import CDC_STREAM, RECONCILE_LAST_KEY, order_key
from tests.e2e.conftest import LocalStack, local_stack, wait_for, wait_until_serving

KEYBOARD = {"items": [{"product_id": "prod-keyboard", "quantity": 1}]}
RUN_TIMEOUT_SECONDS = 120


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with local_stack(tmp_path_factory.mktemp("reconcile")) as local:
        wait_until_serving(local)
        yield local


def cli_env(stack: LocalStack) -> dict[str, str]:
    return {**stack.runner.child_env(), "CQRS_SERVICE_URL": stack.url("cqrs")}


def run_cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], env=cli_env(stack), capture_output=True,
        text=True, timeout=RUN_TIMEOUT_SECONDS, check=False,
    )


def reconcile(stack: LocalStack, *args: str) -> tuple[int, dict[str, Any]]:
    done = run_cli(stack, "reconcile", "--json", *args)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def drift_of(report: dict[str, Any], order_id: str) -> dict[str, Any] | None:
    return next((e for e in report["entities"] if e["id"] == order_id), None)


def create_order(stack: LocalStack, user: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {stack.token(user)}"}
    response = httpx.post(f"{stack.url('router')}/orders", json=KEYBOARD, headers=headers,
                          timeout=10)
    assert response.status_code == 201, response.text
    order: dict[str, Any] = response.json()
    return order


def wait_replicated(stack: LocalStack, order: dict[str, Any]) -> None:
    with stack.redis() as client:
        wait_for(lambda: client.hget(order_key(order["id"]), "version") == str(order["version"]),
                 what="the order in the read model")
    wait_for(lambda: write_model_version(stack, order["id"]) == order["version"],
             what="the order in the write model")


def write_model_version(stack: LocalStack, order_id: str) -> int | None:
    with sqlite3.connect(stack.data_dir / "cqrs.db") as connection:
        row = connection.execute("SELECT version FROM orders WHERE id = ?", (order_id,)).fetchone()
    return None if row is None else int(row[0])


def test_clean_platform_has_no_drift(stack: LocalStack) -> None:
    code, report = reconcile(stack)

    assert code == 0
    assert report["drift_entities"] == 0
    assert report["entities"] == []


def test_in_flight_order_not_drift(stack: LocalStack) -> None:
    stack.runner.stop_process("projector")
    try:
        order = create_order(stack, "bob")
        running = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "reconcile", "--json", "--wait", "30"],
            env=cli_env(stack), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        # The run starts while the order is on cdc.monolith but not yet projected.
        time.sleep(2.0)
    finally:
        stack.runner.start_process("projector")
    stdout, stderr = running.communicate(timeout=RUN_TIMEOUT_SECONDS)

    assert running.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["drift_entities"] == 0
    assert drift_of(report, order["id"]) is None


def test_write_model_edit_reported_and_repaired(stack: LocalStack) -> None:
    order = create_order(stack, "bob")
    wait_replicated(stack, order)
    with sqlite3.connect(stack.data_dir / "cqrs.db") as connection:
        connection.execute("UPDATE orders SET total_amount = 1 WHERE id = ?", (order["id"],))

    code, report = reconcile(stack)

    assert code == 1
    drift = drift_of(report, order["id"])
    assert drift is not None
    assert drift["problem"] == "conflicting"
    assert drift["side"] == ["write_model"]
    assert drift["versions"]["write_model"] == order["version"]
    assert drift["hashes"]["write_model"] != drift["hashes"]["monolith"]
    assert report["conflicting"] == 1

    code, repaired = reconcile(stack, "--repair")

    assert code == 0, repaired
    assert repaired["drift_entities"] == 0
    assert repaired["repaired"] == 1
    assert repaired["before_repair"]["conflicting"] == 1


def test_read_model_edit_reported_and_repaired(stack: LocalStack) -> None:
    order = create_order(stack, "alice")
    wait_replicated(stack, order)
    with stack.redis() as client:
        edited = {**json.loads(client.hget(order_key(order["id"]), "json")), "status": "shipped"}
        client.hset(order_key(order["id"]), "json", json.dumps(edited))

    code, report = reconcile(stack)

    assert code == 1
    drift = drift_of(report, order["id"])
    assert drift is not None
    assert drift["problem"] == "conflicting"
    assert drift["side"] == ["read_model"]

    code, repaired = reconcile(stack, "--repair")

    assert code == 0, repaired
    assert repaired["drift_entities"] == 0
    with stack.redis() as client:
        assert json.loads(client.hget(order_key(order["id"]), "json"))["status"] == "pending"


def test_deleted_event_reported_and_repaired(stack: LocalStack) -> None:
    consumers = ("cdc-ingest", "projector")
    for name in consumers:
        stack.runner.stop_process(name)
    try:
        order = create_order(stack, "bob")
        with stack.redis() as client:
            entry_ids = wait_for(
                lambda: [entry_id for entry_id, fields in client.xrange(CDC_STREAM)
                         if fields.get("subject") == f"order/{order['id']}"],
                what="the order on cdc.monolith",
            )
            assert client.xdel(CDC_STREAM, *entry_ids) == len(entry_ids)
    finally:
        for name in consumers:
            stack.runner.start_process(name)

    code, report = reconcile(stack)

    assert code == 1
    drift = drift_of(report, order["id"])
    assert drift is not None
    assert drift["problem"] == "missing"
    assert sorted(drift["side"]) == ["read_model", "write_model"]
    assert drift["newest"] == "monolith"
    assert report["missing"] == 1

    code, repaired = reconcile(stack, "--repair")

    assert code == 0, repaired
    assert repaired["drift_entities"] == 0
    assert write_model_version(stack, order["id"]) == order["version"]


def test_result_stored_and_exported(stack: LocalStack) -> None:
    order = create_order(stack, "bob")
    wait_replicated(stack, order)
    with stack.redis() as client:
        client.hset(order_key(order["id"]), "version", str(order["version"] - 1 or 0))

    code, _report = reconcile(stack)

    assert code == 1
    with stack.redis() as client:
        stored = client.hgetall(RECONCILE_LAST_KEY)
    assert stored["stale"] == "1"
    assert stored["drift_entities"] == "1"
    assert stored["missing"] == stored["conflicting"] == "0"
    assert float(stored["finished_at"]) == pytest.approx(time.time(), abs=60)
    assert json.loads(stored["report"])["entities"][0]["id"] == order["id"]
    metrics = httpx.get(f"{stack.url('cqrs')}/metrics", timeout=5).text
    assert 'ztcqrs_reconcile_drift_entities{problem="stale"} 1.0' in metrics
    assert 'ztcqrs_reconcile_drift_entities{problem="missing"} 0.0' in metrics
    assert "ztcqrs_reconcile_last_run_duration_seconds" in metrics

    code, _repaired = reconcile(stack, "--repair")

    assert code == 0
    metrics = httpx.get(f"{stack.url('cqrs')}/metrics", timeout=5).text
    assert 'ztcqrs_reconcile_drift_entities{problem="stale"} 0.0' in metrics
    assert "ztcqrs_reconcile_repaired_entities 1.0" in metrics


def test_conflict_listed_by_conflicts_command(stack: LocalStack) -> None:
    order = create_order(stack, "bob")
    wait_replicated(stack, order)
    with sqlite3.connect(stack.data_dir / "cqrs.db") as connection:
        connection.execute("UPDATE orders SET status = 'paid' WHERE id = ?", (order["id"],))
    code, _report = reconcile(stack, "--repair")
    assert code == 0

    done = run_cli(stack, "conflicts", "--side", "cqrs", "--json")

    assert done.returncode == 0, done.stderr
    rows = [row for row in json.loads(done.stdout)["conflicts"] if row["entity_id"] == order["id"]]
    assert len(rows) == 1
    assert rows[0]["side"] == "cqrs"
    assert rows[0]["local"]["status"] == "paid"
    assert rows[0]["incoming"]["status"] == "pending"
    assert rows[0]["resolution"] == "conflict_apply"
    assert rows[0]["recorded_at"]

    text = run_cli(stack, "conflicts")

    assert text.returncode == 0, text.stderr
    assert order["id"] in text.stdout
    assert "conflict_apply" in text.stdout


def test_unreachable_service_exit_code(stack: LocalStack) -> None:
    done = run_cli(stack, "reconcile", "--monolith-url", "http://127.0.0.1:9")

    assert done.returncode == 2
    assert "http://127.0.0.1:9/internal/reconcile" in done.stderr
