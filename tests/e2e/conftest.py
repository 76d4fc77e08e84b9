"""End-to-end fixtures: the whole platform as real uvicorn processes, started by the local runner
on free loopback ports with its own embedded Redis and SQLite files in a temporary folder."""

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from services.cli.runner import LocalPlatform, PlatformConfig
from tests.conftest import free_port

DEMO_PASSWORD = "demo-pass"
REPLICATION_TIMEOUT_SECONDS = 15.0


@dataclass
class Platform:
    runner: LocalPlatform
    data_dir: Path

    def url(self, service: str) -> str:
        return self.runner.config.url(service)

    @property
    def rules_file(self) -> Path:
        return self.runner.rules_file

    def redis(self) -> "redis.Redis[str]":
        return redis.Redis.from_url(self.runner.redis_url, decode_responses=True)

    def token(self, username: str, *, scope: str | None = None) -> str:
        form = {"grant_type": "password", "username": username, "password": DEMO_PASSWORD}
        if scope is not None:
            form["scope"] = scope
        response = httpx.post(f"{self.url('auth')}/token", data=form, timeout=10)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def client_token(self, client_id: str, secret: str) -> str:
        form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
        response = httpx.post(f"{self.url('auth')}/token", data=form, timeout=10)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


def wait_for(
    check: Callable[[], Any],
    *,
    timeout: float = REPLICATION_TIMEOUT_SECONDS,
    what: str = "condition",
) -> Any:
    """Poll `check` until it returns a truthy value, failing the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    data_dir = tmp_path_factory.mktemp("platform")
    config = PlatformConfig(
        data_dir=data_dir,
        ports={name: free_port() for name in ("auth", "monolith", "cqrs", "router")},
        redis_port=free_port(),
        extra_env={"ROUTER_RULES_POLL_SECONDS": "0.2", "CQRS_CLAIM_IDLE_MS": "2000"},
    )
    runner = LocalPlatform(config)
    runner.start()
    platform = Platform(runner, data_dir)
    stop_supervising = threading.Event()
    supervisor = threading.Thread(target=runner.supervise, args=(stop_supervising,), daemon=True)
    supervisor.start()
    try:
        token = platform.token("alice")
        wait_for(
            lambda: (
                httpx.get(
                    f"{platform.url('cqrs')}/queries/products",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=5,
                )
                .json()
                .get("products")
            ),
            what="the demo catalogue to reach the CQRS side",
        )
        yield platform
    finally:
        stop_supervising.set()
        supervisor.join()
        runner.stop()


@pytest.fixture(scope="session")
def alice(platform: Platform) -> dict[str, str]:
    return {"Authorization": f"Bearer {platform.token('alice')}"}


@pytest.fixture(scope="session")
def bob(platform: Platform) -> dict[str, str]:
    return {"Authorization": f"Bearer {platform.token('bob')}"}
