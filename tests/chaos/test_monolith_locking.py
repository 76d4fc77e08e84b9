"""Concurrent writers on the monolith's SQLite file: the API, the sync API, the CDC relay and a
raw SQL writer in another process all write at once, and none of them gets a lock error."""

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import func, select

from services.monolith.app import create_app
from services.monolith.schema import change_log, open_database
from services.monolith.settings import Settings
from services.monolith.workers.cdc_relay import read_checkpoint
from services.shared.names import CDC_STREAM
from services.shared.security import StaticKeySource
from tests.chaos.support import order_state, start_worker, wait_until, worker_env
from tests.conftest import TEST_ISSUER, SigningKey

API_WRITERS = 8
ORDERS_PER_WRITER = 25
SYNC_WRITERS = 4
SYNCS_PER_WRITER = 25
RAW_UPDATES = 300
SYNC_CLIENT = "cqrs-reverse-sync"

# Runs in its own process: single-row UPDATEs and INSERTs, each in its own write transaction,
# through the same engine settings as the services.
RAW_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from sqlalchemy import text
    from services.shared.database import create_sqlite_engine

    engine = create_sqlite_engine(Path(sys.argv[1]))
    for index in range(int(sys.argv[2])):
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE products SET price = price + 1 WHERE id = 'prod-cable'")
            )
            connection.execute(text(
                "INSERT INTO users (id, username, display_name, updated_at) "
                "VALUES (:id, :id, 'Raw', '2030-01-01T00:00:00.000000Z')"
            ), {"id": f"raw-{index}"})
    print("raw writer done")
    """
)


def start_raw_writer(database: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RAW_WRITER, str(database), str(RAW_UPDATES)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


async def api_writer(client: httpx.AsyncClient, headers: dict[str, str]) -> list[int]:
    statuses = []
    for _index in range(ORDERS_PER_WRITER):
        created = await client.post(
            "/orders", json={"items": [{"product_id": "prod-keyboard", "quantity": 1}]},
            headers=headers,
        )
        statuses.append(created.status_code)
        if created.status_code == 201:
            paid = await client.post(f"/orders/{created.json()['id']}/pay", headers=headers)
            statuses.append(paid.status_code)
    return statuses


async def sync_writer(client: httpx.AsyncClient, headers: dict[str, str], writer: int) -> list[int]:
    statuses = []
    for index in range(SYNCS_PER_WRITER):
        state = order_state(f"synced-{writer}-{index}")
        response = await client.put(
            f"/internal/sync/orders/{state['id']}",
            json={"state": state, "event_id": f"event-{writer}-{index}"}, headers=headers,
        )
        statuses.append(response.status_code)
    return statuses


async def test_concurrent_writers_no_lock_errors(
    data_dir: Path, redis_url: str, signing_key: SigningKey, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    settings = Settings(data_dir=data_dir, redis_url=redis_url, token_issuer=TEST_ISSUER)
    database = settings.resolved_database_path
    engine = open_database(settings, seed=True)
    relay_log = tmp_path / "relay.log"
    relay = start_worker(
        "cdc-relay",
        worker_env(data_dir, redis_url, MONOLITH_RELAY_BATCH_SIZE="20",
                   MONOLITH_RELAY_POLL_INTERVAL_SECONDS="0.01"),
        relay_log,
    )
    raw_writer = start_raw_writer(database)
    user = {"Authorization": f"Bearer {signing_key.token('bob')}"}
    service = {"Authorization": "Bearer " + signing_key.token(
        SYNC_CLIENT, scope="sync:write", client_id=SYNC_CLIENT
    )}
    app = create_app(settings, key_source=StaticKeySource(signing_key.jwks))
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://monolith.test",
                                     timeout=60) as client:
            results = await asyncio.gather(
                *(api_writer(client, user) for _ in range(API_WRITERS)),
                *(sync_writer(client, service, writer) for writer in range(SYNC_WRITERS)),
            )
        raw_out, raw_err = raw_writer.communicate(timeout=120)

        with engine.connect() as connection:
            last_seq = connection.execute(select(func.max(change_log.c.seq))).scalar_one()
        wait_until(lambda: read_checkpoint(engine) >= last_seq, timeout=60,
                   condition="the relay to reach the end of the change log")
    finally:
        relay.terminate()
        relay.wait(timeout=10)
        if raw_writer.poll() is None:
            raw_writer.kill()
            raw_writer.wait()

    statuses = [status for result in results for status in result]
    assert len(statuses) == API_WRITERS * ORDERS_PER_WRITER * 2 + SYNC_WRITERS * SYNCS_PER_WRITER
    assert set(statuses) <= {200, 201}, sorted(set(statuses))
    assert raw_writer.returncode == 0, raw_err
    assert "raw writer done" in raw_out
    relay_text = relay_log.read_text()
    assert "locked" not in relay_text
    assert "relay round failed" not in relay_text
    assert not [record for record in caplog.records if "locked" in record.getMessage()]

    # Every write reached the change log and, when made on the monolith, the stream.
    with engine.connect() as connection:
        users_logged = connection.execute(
            select(func.count()).select_from(change_log)
            .where(change_log.c.table_name == "users", change_log.c.row_id.like("raw-%"))
        ).scalar_one()
    assert users_logged == RAW_UPDATES
    client_redis = redis.Redis.from_url(redis_url, decode_responses=True)
    entries = [fields for _entry_id, fields in client_redis.xrange(CDC_STREAM)]
    client_redis.close()
    orders_published = {
        (fields["subject"], int(fields["aggregateversion"]))
        for fields in entries if fields["subject"].startswith("order/")
    }
    assert len(orders_published) == API_WRITERS * ORDERS_PER_WRITER * 2
    assert not [subject for subject, _ in orders_published if "synced-" in subject]
    cable_prices = [json.loads(fields["data"])["price"] for fields in entries
                    if fields["subject"] == "product/prod-cable"]
    assert max(cable_prices) == 990 + RAW_UPDATES
    engine.dispose()
