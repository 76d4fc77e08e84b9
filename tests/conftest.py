"""Fixtures shared by every test: a real Redis server on a free port, RSA keys and tokens."""

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from services.shared.embedded_redis import EmbeddedRedis

# The `monolith` and `cqrs` stand-in upstreams of the router tests.
pytest_plugins = ["tests.router_support"]

TEST_ISSUER = "http://issuer.test"
TEST_AUDIENCE = "ztcqrs-api"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """URL of the session's Redis server, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


class SigningKey:
    """A real RSA key pair that mints RFC 9068 access tokens for component tests."""

    def __init__(self, kid: str | None = None) -> None:
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = kid or uuid.uuid4().hex

    @property
    def jwks(self) -> dict[str, Any]:
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}

    @property
    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def token(
        self,
        subject: str = "alice",
        *,
        scope: str = "orders:read orders:write products:read",
        client_id: str = "ztcqrs-web",
        lifetime: int = 300,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": TEST_ISSUER,
            "aud": TEST_AUDIENCE,
            "sub": subject,
            "iat": now,
            "exp": now + lifetime,
            "jti": uuid.uuid4().hex,
            "client_id": client_id,
            "scope": scope,
        }
        if subject != client_id:
            payload["username"] = subject
        payload.update(claims)
        header = {"kid": self.kid, "typ": "at+jwt", **(headers or {})}
        return jwt.encode(payload, self.private_key, algorithm="RS256", headers=header)


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    return SigningKey()


@pytest.fixture
def auth_header(signing_key: SigningKey) -> Callable[..., dict[str, str]]:
    def build(subject: str = "alice", **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {signing_key.token(subject, **kwargs)}"}

    return build


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path
