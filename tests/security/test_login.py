"""Sign-in against the real auth server: Argon2id hashes, throttling per account and per client
address, and the same response and similar timing for unknown users and wrong passwords.

Each test sends from its own loopback address (127.0.0.x) or uses made-up usernames, so the
throttling it provokes never blocks another test.
"""

import sqlite3
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.auth.app import create_app
from services.auth.settings import Settings

from .conftest import SecurityPlatform


def sign_in(
    platform: SecurityPlatform, username: str, password: str, *, source: str
) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=10) as client:
        return client.post(
            f"{platform.url('auth')}/token",
            data={"grant_type": "password", "username": username, "password": password},
        )


def made_up_user() -> str:
    return f"nobody-{uuid.uuid4().hex[:12]}"


def test_passwords_hashed_with_argon2id(security_platform: SecurityPlatform) -> None:
    with sqlite3.connect(security_platform.data_dir / "auth.db") as connection:
        hashes = [row[0] for row in connection.execute("SELECT password_hash FROM users")]

    assert hashes
    for value in hashes:
        assert value.startswith("$argon2id$"), value
        assert "m=65536" in value


def test_unknown_user_same_answer(security_platform: SecurityPlatform) -> None:
    unknown = sign_in(security_platform, made_up_user(), "demo-pass", source="127.0.0.6")
    wrong = sign_in(security_platform, "bob", "not-the-password", source="127.0.0.6")

    assert unknown.status_code == wrong.status_code == 400
    assert unknown.json() == wrong.json()
    assert unknown.json()["error"] == "invalid_grant"


def test_throttle_per_account(security_platform: SecurityPlatform) -> None:
    target = made_up_user()
    answers = [
        sign_in(security_platform, target, f"guess-{index}", source="127.0.0.4").status_code
        for index in range(5)
    ]

    throttled = sign_in(security_platform, target, "guess-6", source="127.0.0.4")
    elsewhere = sign_in(security_platform, target, "guess-7", source="127.0.0.5")
    other_account = sign_in(security_platform, made_up_user(), "guess", source="127.0.0.5")

    assert answers == [400] * 5
    assert throttled.status_code == 429
    assert throttled.json()["error"] == "slow_down"
    assert 1 <= int(throttled.headers["retry-after"]) <= 300
    assert elsewhere.status_code == 429
    assert other_account.status_code == 400


def test_throttle_per_address(security_platform: SecurityPlatform) -> None:
    answers = [
        sign_in(security_platform, made_up_user(), "guess", source="127.0.0.3").status_code
        for _ in range(20)
    ]

    # Even the right password is not checked from an address over its limit.
    from_attacker = sign_in(security_platform, "alice", "demo-pass", source="127.0.0.3")
    from_alice = sign_in(security_platform, "alice", "demo-pass", source="127.0.0.1")

    assert answers == [400] * 20
    assert from_attacker.status_code == 429
    assert from_attacker.json()["error"] == "slow_down"
    assert from_alice.status_code == 200


def test_throttle_client_secrets(security_platform: SecurityPlatform) -> None:
    client_id = f"svc-{uuid.uuid4().hex[:12]}"
    transport = httpx.HTTPTransport(local_address="127.0.0.7")
    with httpx.Client(transport=transport, timeout=10) as client:
        statuses = [
            client.post(
                f"{security_platform.url('auth')}/token",
                data={
                    "grant_type": "client_credentials", "client_id": client_id,
                    "client_secret": f"guess-{index}",
                },
            ).status_code
            for index in range(6)
        ]

    assert statuses == [401] * 5 + [429]


@pytest.fixture
async def local_auth(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """An auth app in this process with throttling far away, for timing many failures."""
    settings = Settings(
        data_dir=tmp_path,
        env="development",
        redis_url="redis://127.0.0.1:1/0",
        login_max_failures_per_account=1000,
        login_max_failures_per_address=1000,
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://auth.test") as client,
    ):
        yield client


async def test_unknown_user_similar_timing(local_auth: httpx.AsyncClient) -> None:
    async def seconds(username: str) -> float:
        started = time.perf_counter()
        response = await local_auth.post(
            "/token",
            data={"grant_type": "password", "username": username, "password": "wrong-pass"},
        )
        assert response.status_code == 400
        return time.perf_counter() - started

    await seconds("bob")  # warm-up
    unknown = [await seconds(made_up_user()) for _ in range(8)]
    wrong = [await seconds("bob") for _ in range(8)]

    # Without the dummy hash, the response for an unknown user would come about a hundred times
    # faster.
    fast, slow = sorted([statistics.median(unknown), statistics.median(wrong)])
    assert fast / slow > 0.6, (unknown, wrong)
