"""Key rotation and JWKS outage, as sequences against a real auth server and a real router.

Each test runs its own auth server (short token lifetime, fast key reloads) so that rotating or
stopping it disturbs nothing else, and a router in front of recording upstreams.
"""

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.cli.runner import ManagedProcess
from services.shared.embedded_redis import EmbeddedRedis
from tests.conftest import free_port
from tests.e2e.conftest import wait_for

from .conftest import RecordingRouter, recording_router, start_service

TOKEN_TTL_SECONDS = 3
LEEWAY_SECONDS = 1
RELOAD_SECONDS = 0.2


@dataclass
class AuthServer:
    url: str
    port: int
    env: dict[str, str]
    folder: Path
    process: ManagedProcess | None = None

    def start(self) -> None:
        self.process = start_service("auth", "auth", self.env, self.folder, self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def token(self) -> str:
        form = {"grant_type": "password", "username": "alice", "password": "demo-pass"}
        response = httpx.post(f"{self.url}/token", data=form, timeout=10)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def jwks_kids(self) -> list[str]:
        keys = httpx.get(f"{self.url}/.well-known/jwks.json", timeout=5).json()["keys"]
        return [key["kid"] for key in keys]

    def keys_command(self, *args: str) -> list[dict[str, object]]:
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "keys", *args],
            env=self.env, capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def auth_server(
    redis_server: EmbeddedRedis, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[AuthServer]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "ZTCQRS_ENV": "development",
        "ZTCQRS_DATA_DIR": str(tmp_path / "data"),
        "REDIS_URL": redis_server.url,
        "ZTCQRS_TOKEN_ISSUER": url,
        "ZTCQRS_JWKS_URL": f"{url}/.well-known/jwks.json",
        "ZTCQRS_TOKEN_LEEWAY_SECONDS": str(LEEWAY_SECONDS),
        "AUTH_ISSUER": url,
        "AUTH_PORT": str(port),
        "AUTH_KEYS_RELOAD_SECONDS": str(RELOAD_SECONDS),
        "PYTHONUNBUFFERED": "1",
        **getattr(request, "param", {}),
    }
    server = AuthServer(url, port, env, tmp_path)
    server.start()
    yield server
    server.stop()


def metric(router: RecordingRouter, name: str, **labels: str) -> float:
    text = httpx.get(f"{router.url}/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def status_with(router: RecordingRouter, token: str) -> int:
    return httpx.get(
        f"{router.url}/orders", headers={"Authorization": f"Bearer {token}"}, timeout=5
    ).status_code


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


@pytest.mark.parametrize(
    "auth_server", [{"AUTH_TOKEN_TTL_SECONDS": str(TOKEN_TTL_SECONDS)}], indirect=True
)
def test_rotation_keeps_live_tokens(auth_server: AuthServer, tmp_path: Path) -> None:
    with recording_router(
        auth_server.env, tmp_path / "router", ZTCQRS_JWKS_MIN_REFRESH_SECONDS="2"
    ) as router:
        old_token = auth_server.token()
        old_kid = kid_of(old_token)
        assert status_with(router, old_token) == 200

        # Publish first: the new key is in the JWKS before any token carries it.
        (rotated,) = auth_server.keys_command("rotate", "--activate-in", "2")
        new_kid = str(rotated["kid"])
        wait_for(lambda: new_kid in auth_server.jwks_kids(), timeout=3, what="the new key")
        assert kid_of(auth_server.token()) == old_kid

        # Then sign: after the activation time new tokens carry the new key id. The router
        # verifies them (it learns the key on the unknown kid) and still accepts the last token
        # signed with the old key.
        last_old: list[str] = []

        def token_with_new_kid() -> str | None:
            token = auth_server.token()
            if kid_of(token) == new_kid:
                return token
            last_old[:] = [token]
            return None

        new_token = wait_for(token_with_new_kid, timeout=5, what="tokens signed with the new key")
        assert last_old, "no token was signed with the old key after the rotation"
        assert status_with(router, new_token) == 200
        assert status_with(router, last_old[0]) == 200
        assert old_kid in auth_server.jwks_kids()

        # The old key leaves the JWKS once the last token it signed has expired, and the next
        # rotation deletes it from the key folder.
        wait_for(
            lambda: old_kid not in auth_server.jwks_kids(),
            timeout=TOKEN_TTL_SECONDS + LEEWAY_SECONDS + 5, what="the old key to be withdrawn",
        )
        assert status_with(router, last_old[0]) == 401
        (second,) = auth_server.keys_command("rotate", "--activate-in", "60")
        assert second["removed_kids"] == [old_kid]
        listed = {str(key["kid"]): key for key in auth_server.keys_command("list")}
        assert listed[new_kid]["state"] == "active"
        assert listed[str(second["kid"])]["state"] == "scheduled"
        assert old_kid not in listed
        assert status_with(router, auth_server.token()) == 200


def test_unknown_kids_refresh_once(auth_server: AuthServer, tmp_path: Path) -> None:
    with recording_router(
        auth_server.env, tmp_path / "router", ZTCQRS_JWKS_MIN_REFRESH_SECONDS="30"
    ) as router:
        token = auth_server.token()
        assert status_with(router, token) == 200
        jwks_url = auth_server.env["ZTCQRS_JWKS_URL"]
        before = metric(router, "ztcqrs_jwks_refreshes_total", url=jwks_url)

        _, payload, signature = token.split(".")
        statuses = []
        for _ in range(25):
            forged_header = jwt.utils.base64url_encode(json.dumps(
                {"alg": "RS256", "typ": "at+jwt", "kid": uuid.uuid4().hex}
            ).encode()).decode()
            statuses.append(status_with(router, f"{forged_header}.{payload}.{signature}"))

        assert statuses == [401] * 25
        assert metric(router, "ztcqrs_jwks_refreshes_total", url=jwks_url) - before <= 1
        assert metric(router, "ztcqrs_jwks_unknown_kid_total", url=jwks_url) >= 25


def test_jwks_outage_bounded(auth_server: AuthServer, tmp_path: Path) -> None:
    max_stale = 4.0
    # One process: each worker process bounds the age of its own cached keys, from its own last
    # fetch, so with several the first 503 and the last 200 can come from different processes.
    with recording_router(
        auth_server.env, tmp_path / "router",
        ZTCQRS_JWKS_MAX_STALE_SECONDS=str(max_stale),
        ZTCQRS_JWKS_REFRESH_SECONDS="0.5",
        ZTCQRS_JWKS_MIN_REFRESH_SECONDS="0.5",
        ROUTER_PROCESSES="1",
    ) as router:
        token = auth_server.token()
        assert status_with(router, token) == 200
        jwks_url = auth_server.env["ZTCQRS_JWKS_URL"]
        mark = router.monolith.count()

        auth_server.stop()
        stopped_at = time.monotonic()
        # Cached keys keep verifying for a while, and the metrics show that they are stale.
        time.sleep(1.0)
        assert status_with(router, token) == 200
        wait_for(
            lambda: metric(router, "ztcqrs_jwks_stale", url=jwks_url) == 1,
            timeout=3, what="the stale-keys gauge",
        )
        assert metric(router, "ztcqrs_jwks_refreshes_total", url=jwks_url, result="failure") >= 1

        # Then the router fails closed, and no request reaches an upstream.
        def rejected() -> httpx.Response | None:
            response = httpx.get(
                f"{router.url}/orders", headers={"Authorization": f"Bearer {token}"}, timeout=5
            )
            return response if response.status_code == 503 else None

        closed = wait_for(rejected, timeout=max_stale + 3, what="the router to fail closed")
        # The limit counts from the last successful fetch, which came shortly before the stop.
        assert time.monotonic() - stopped_at <= max_stale + 3
        assert closed.json()["error"] == "unavailable"
        forwarded_before_close = router.monolith.count() - mark
        assert status_with(router, token) == 503
        assert router.monolith.count() - mark == forwarded_before_close

        # Back in service as soon as the JWKS can be fetched again.
        auth_server.start()
        wait_for(lambda: status_with(router, token) == 200, timeout=5, what="recovery")
        assert metric(router, "ztcqrs_jwks_stale", url=jwks_url) == 0
