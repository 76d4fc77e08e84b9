"""Workers serve Prometheus metrics on METRICS_PORT: apply lag, relay publish lag, relay reports."""

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from sqlalchemy import text

from services.monolith.schema import open_database
from services.monolith.settings import Settings as MonolithSettings
from services.shared.names import CDC_RELAY_NAME, CDC_STREAM, PROJECTOR_GROUP, RELAY_LAG_KEY
from tests.chaos.support import start_worker, wait_until, worker_env
from tests.conftest import free_port


@pytest.fixture
def stop_later() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def scrape(port: int) -> str:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1.0)
    except httpx.HTTPError:
        return ""
    return response.text if response.status_code == 200 else ""


def histogram_count(metrics: str, name: str, **labels: str) -> float:
    """Return the `_count` sample of histogram `name` with exactly `labels`, 0 when absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in metrics.splitlines():
        if line.startswith(f"{name}_count{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_relay_and_projector_serve_their_lag(
    data_dir: Path, redis_url: str, tmp_path: Path, stop_later: list[subprocess.Popen[bytes]]
) -> None:
    settings = MonolithSettings(data_dir=data_dir, redis_url=redis_url)
    engine = open_database(settings, seed=True)
    with engine.begin() as connection:
        connection.execute(text("UPDATE products SET price = 1000 WHERE id = 'prod-cable'"))
    engine.dispose()
    relay_port, projector_port = free_port(), free_port()

    stop_later.append(start_worker(
        "cdc-relay", worker_env(data_dir, redis_url, METRICS_PORT=str(relay_port)),
        tmp_path / "cdc-relay.log",
    ))
    stop_later.append(start_worker(
        "projector", worker_env(data_dir, redis_url, METRICS_PORT=str(projector_port)),
        tmp_path / "projector.log",
    ))

    relay_metrics = wait_until(
        lambda: (m := scrape(relay_port))
        and histogram_count(m, "ztcqrs_relay_publish_lag_seconds", relay=CDC_RELAY_NAME) > 0
        and m,
        timeout=30, condition="the CDC relay's publish lag histogram",
    )
    assert "ztcqrs_relay_publish_lag_seconds_bucket" in relay_metrics
    wait_until(
        lambda: scrape(projector_port)
        and histogram_count(
            scrape(projector_port), "ztcqrs_apply_lag_seconds",
            stream=CDC_STREAM, group=PROJECTOR_GROUP,
        ) > 0,
        timeout=30, condition="the projector's apply lag histogram",
    )

    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        report = wait_until(
            lambda: client.hgetall(RELAY_LAG_KEY), timeout=10, condition="a relay lag report"
        )
    finally:
        client.close()
    # Caught up: nothing older than the last round is waiting.
    assert float(report[CDC_RELAY_NAME]) < 5.0
    assert float(report[f"{CDC_RELAY_NAME}:at"]) > 0
