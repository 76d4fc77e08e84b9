"""User and client store of the auth server, and what each mode seeds."""

import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from argon2 import PasswordHasher
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from services.auth.app import create_app
from services.auth.settings import Settings
from services.auth.store import AuthStore, CredentialsRejected, open_store
from services.shared.errors import Conflict, ValidationFailed
from services.shared.scopes import SYNC_WRITE
from services.shared.settings import DEMO_PASSWORD

PRODUCTION_SECRET = "a-long-random-production-secret"


@pytest.fixture(autouse=True)
def _empty_redis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the auth server at an emptied Redis, where it counts failed sign-ins per test."""
    monkeypatch.setenv("REDIS_URL", redis_url)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "signing-key.pem"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def production_settings(data_dir: Path, key_file: Path, **values: object) -> Settings:
    return Settings(data_dir=data_dir, env="production", signing_key_file=key_file, **values)


@pytest.fixture
def production_store(data_dir: Path, key_file: Path) -> Iterator[AuthStore]:
    store = open_store(production_settings(data_dir, key_file))
    yield store
    store.engine.dispose()


@pytest.fixture
def development_store(data_dir: Path) -> Iterator[AuthStore]:
    store = open_store(Settings(data_dir=data_dir, env="development"))
    yield store
    store.engine.dispose()


def rows(database: Path, table: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(database) as connection:
        return connection.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608


async def client_for(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client,
    ):
        yield client


async def login(app: FastAPI, username: str, password: str) -> httpx.Response:
    async for client in client_for(app):
        return await client.post(
            "/token",
            data={"grant_type": "password", "username": username, "password": password},
        )
    raise AssertionError("the client was not created")


def test_production_seeds_nothing(data_dir: Path, key_file: Path) -> None:
    app = create_app(production_settings(data_dir, key_file))
    app.state.store.engine.dispose()

    assert rows(data_dir / "auth.db", "users") == []
    assert rows(data_dir / "auth.db", "clients") == []


def test_development_seed_idempotent(data_dir: Path) -> None:
    for _ in range(2):
        app = create_app(Settings(data_dir=data_dir, env="development"))
        app.state.store.engine.dispose()

    users = {row[1]: row for row in rows(data_dir / "auth.db", "users")}
    clients = {row[0]: row for row in rows(data_dir / "auth.db", "clients")}
    assert sorted(users) == ["alice", "bob"]
    assert users["alice"][0] == "alice"
    assert users["alice"][3] == 1
    assert users["bob"][3] == 0
    assert sorted(clients) == ["cqrs-reverse-sync", "ztcqrs-admin", "ztcqrs-web"]
    assert clients["ztcqrs-web"][1] is None
    assert clients["cqrs-reverse-sync"][2] == SYNC_WRITE
    assert clients["ztcqrs-admin"][2] == "gray:admin"


def test_password_hashes_are_argon2(data_dir: Path) -> None:
    app = create_app(Settings(data_dir=data_dir, env="development"))
    app.state.store.engine.dispose()

    for row in rows(data_dir / "auth.db", "users"):
        password_hash = str(row[2])
        assert password_hash.startswith("$argon2id$")
        assert DEMO_PASSWORD not in password_hash
        assert PasswordHasher().verify(password_hash, DEMO_PASSWORD)


def test_production_create_user_demo_rejected(production_store: AuthStore) -> None:
    with pytest.raises(ValidationFailed) as raised:
        production_store.create_user("carol", DEMO_PASSWORD)

    assert raised.value.field == "password"
    assert production_store.get_user("carol") is None


async def test_production_demo_login_rejected(data_dir: Path, key_file: Path) -> None:
    # A database first used in development mode still contains alice with the demo password.
    create_app(Settings(data_dir=data_dir, env="development")).state.store.engine.dispose()
    app = create_app(production_settings(data_dir, key_file))

    response = await login(app, "alice", DEMO_PASSWORD)

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert "demo password" in response.json()["error_description"]


async def test_production_created_user_logs_in(data_dir: Path, key_file: Path) -> None:
    store = open_store(production_settings(data_dir, key_file))
    store.create_user("carol", "carol-strong-password", beta_tester=True)
    store.create_client(
        "ztcqrs-web",
        secret=None,
        scopes=["orders:read", "orders:write", "products:read"],
        grant_types=["password"],
    )
    store.engine.dispose()
    app = create_app(production_settings(data_dir, key_file))

    response = await login(app, "carol", "carol-strong-password")

    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "orders:read orders:write products:read"


def test_production_registers_configured_clients(data_dir: Path, key_file: Path) -> None:
    settings = production_settings(
        data_dir, key_file, reverse_sync_client_secret=PRODUCTION_SECRET
    )
    app = create_app(settings)
    store: AuthStore = app.state.store

    assert store.authenticate_client("cqrs-reverse-sync", PRODUCTION_SECRET).scopes == {
        SYNC_WRITE
    }
    assert store.get_client("ztcqrs-admin") is None
    assert rows(data_dir / "auth.db", "users") == []
    store.engine.dispose()


def test_client_secret_rotated(data_dir: Path, key_file: Path) -> None:
    first = production_settings(data_dir, key_file, reverse_sync_client_secret=PRODUCTION_SECRET)
    create_app(first).state.store.engine.dispose()
    rotated = production_settings(
        data_dir, key_file, reverse_sync_client_secret="another-long-random-secret"
    )
    store: AuthStore = create_app(rotated).state.store

    with pytest.raises(CredentialsRejected):
        store.authenticate_client("cqrs-reverse-sync", PRODUCTION_SECRET)
    assert store.authenticate_client("cqrs-reverse-sync", "another-long-random-secret")
    store.engine.dispose()


@pytest.mark.parametrize("secret", ["dev-reverse-sync-secret", DEMO_PASSWORD, "short"])
def test_production_weak_secret_rejected(data_dir: Path, key_file: Path, secret: str) -> None:
    settings = production_settings(data_dir, key_file, reverse_sync_client_secret=secret)

    with pytest.raises(ValueError, match="AUTH_REVERSE_SYNC_CLIENT_SECRET"):
        create_app(settings)


def test_create_user_duplicate(development_store: AuthStore) -> None:
    development_store.create_user("dave", "dave-password")

    with pytest.raises(Conflict, match="dave"):
        development_store.create_user("dave", "other-password")


@pytest.mark.parametrize(
    ("username", "password", "field"),
    [("bad name", "long-enough", "username"), ("erin", "short", "password")],
)
def test_create_user_invalid(
    development_store: AuthStore, username: str, password: str, field: str
) -> None:
    with pytest.raises(ValidationFailed) as raised:
        development_store.create_user(username, password)

    assert raised.value.field == field


def test_user_sync_scope_not_grantable(development_store: AuthStore) -> None:
    with pytest.raises(ValidationFailed) as raised:
        development_store.create_user("frank", "frank-password", scopes=[SYNC_WRITE])

    assert raised.value.field == "scopes"


def test_public_client_credentials_rejected(development_store: AuthStore) -> None:
    with pytest.raises(ValidationFailed) as raised:
        development_store.create_client(
            "public-worker", secret=None, scopes=["orders:read"], grant_types=["client_credentials"]
        )

    assert raised.value.field == "secret"


def test_authenticate_user_reasons(development_store: AuthStore) -> None:
    development_store.create_user("gina", "gina-password", user_id="user-gina")

    assert development_store.authenticate_user("gina", "gina-password").id == "user-gina"
    with pytest.raises(CredentialsRejected) as wrong:
        development_store.authenticate_user("gina", "not-gina-password")
    with pytest.raises(CredentialsRejected) as unknown:
        development_store.authenticate_user("nobody", "gina-password")
    assert wrong.value.reason == "wrong_password"
    assert unknown.value.reason == "unknown_user"


def test_old_hash_upgraded(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, env="development")
    weak = open_store(settings, hasher=PasswordHasher(time_cost=1, memory_cost=8192))
    weak.create_user("hank", "hank-password")
    weak.engine.dispose()
    store = open_store(settings)

    store.authenticate_user("hank", "hank-password")

    stored = {row[1]: str(row[2]) for row in rows(data_dir / "auth.db", "users")}
    assert not PasswordHasher().check_needs_rehash(stored["hank"])
    store.engine.dispose()
