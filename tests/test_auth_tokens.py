"""Token endpoint, JWKS and discovery of the auth server, against a real SQLite file and RSA key."""

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from services.auth.app import create_app
from services.auth.settings import Settings
from services.shared.scopes import GRAY_ADMIN, SYNC_WRITE, USER_SCOPES
from services.shared.security import StaticKeySource, TokenVerifier
from services.shared.settings import DEMO_PASSWORD

ISSUER = "http://127.0.0.1:8000"
AUDIENCE = "ztcqrs-api"


@pytest.fixture(autouse=True)
def _empty_redis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the auth server at an emptied Redis, where it counts failed sign-ins per test."""
    monkeypatch.setenv("REDIS_URL", redis_url)


@pytest.fixture
async def client(data_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(data_dir=data_dir, env="development", issuer=ISSUER, audience=AUDIENCE)
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url=ISSUER) as http,
    ):
        yield http


async def verifier_for(client: httpx.AsyncClient) -> TokenVerifier:
    jwks = (await client.get("/.well-known/jwks.json")).json()
    return TokenVerifier(StaticKeySource(jwks), issuer=ISSUER, audience=AUDIENCE)


async def password_token(
    client: httpx.AsyncClient, username: str, password: str = DEMO_PASSWORD, **extra: str
) -> httpx.Response:
    form = {"grant_type": "password", "username": username, "password": password, **extra}
    return await client.post("/token", data=form)


def basic(client_id: str, secret: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def header_of(token: str) -> dict[str, Any]:
    return jwt.get_unverified_header(token)


@pytest.mark.parametrize(("username", "beta_tester"), [("alice", True), ("bob", False)])
async def test_password_grant_verifies(
    client: httpx.AsyncClient, username: str, beta_tester: bool
) -> None:
    response = await password_token(client, username)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert set(body["scope"].split()) == set(USER_SCOPES)
    assert response.headers["cache-control"] == "no-store"

    principal = await (await verifier_for(client)).verify(body["access_token"])
    assert principal.subject == username
    assert principal.client_id == "ztcqrs-web"
    assert principal.scopes == frozenset(USER_SCOPES)
    assert not principal.is_service
    assert principal.claims["username"] == username
    assert principal.claims["beta_tester"] is beta_tester


async def test_password_grant_token_claims(client: httpx.AsyncClient) -> None:
    token = (await password_token(client, "alice")).json()["access_token"]
    jwks = (await client.get("/.well-known/jwks.json")).json()

    header = header_of(token)
    assert header["alg"] == "RS256"
    assert header["typ"] == "at+jwt"
    assert header["kid"] == jwks["keys"][0]["kid"]

    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == ISSUER
    assert claims["aud"] == AUDIENCE
    assert claims["exp"] - claims["iat"] == 300
    assert claims["nbf"] == claims["iat"]
    assert len(claims["jti"]) == 32
    int(claims["jti"], 16)


async def test_token_ids_unique(client: httpx.AsyncClient) -> None:
    first = (await password_token(client, "alice")).json()["access_token"]
    second = (await password_token(client, "alice")).json()["access_token"]

    first_jti = jwt.decode(first, options={"verify_signature": False})["jti"]
    second_jti = jwt.decode(second, options={"verify_signature": False})["jti"]
    assert first_jti != second_jti


async def test_password_grant_scope_subset(client: httpx.AsyncClient) -> None:
    response = await password_token(client, "bob", scope="orders:read")

    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "orders:read"
    principal = await (await verifier_for(client)).verify(response.json()["access_token"])
    assert principal.scopes == frozenset({"orders:read"})


async def test_client_credentials_form(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "cqrs-reverse-sync",
            "client_secret": "dev-reverse-sync-secret",
        },
    )

    assert response.status_code == 200, response.text
    assert response.json()["scope"] == SYNC_WRITE
    assert response.headers["cache-control"] == "no-store"
    principal = await (await verifier_for(client)).verify(response.json()["access_token"])
    assert principal.subject == "cqrs-reverse-sync"
    assert principal.client_id == "cqrs-reverse-sync"
    assert principal.scopes == frozenset({SYNC_WRITE})
    assert principal.is_service
    assert "username" not in principal.claims
    assert "beta_tester" not in principal.claims


async def test_client_credentials_basic(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/token",
        data={"grant_type": "client_credentials"},
        headers=basic("ztcqrs-admin", "dev-admin-secret"),
    )

    assert response.status_code == 200, response.text
    principal = await (await verifier_for(client)).verify(response.json()["access_token"])
    assert principal.subject == "ztcqrs-admin"
    assert principal.scopes == frozenset({GRAY_ADMIN})


async def test_wrong_password_unknown_user_same(client: httpx.AsyncClient) -> None:
    wrong_password = await password_token(client, "alice", "not-the-password")
    unknown_user = await password_token(client, "mallory", "not-the-password")

    assert wrong_password.status_code == 400
    assert unknown_user.status_code == 400
    assert wrong_password.json() == unknown_user.json()
    assert wrong_password.json()["error"] == "invalid_grant"
    assert wrong_password.headers["cache-control"] == "no-store"
    assert unknown_user.headers["cache-control"] == "no-store"


async def test_user_sync_scope_rejected(client: httpx.AsyncClient) -> None:
    response = await password_token(client, "alice", scope=f"orders:read {SYNC_WRITE}")

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"
    assert SYNC_WRITE in response.json()["error_description"]


async def test_client_extra_scope_rejected(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/token",
        data={"grant_type": "client_credentials", "scope": GRAY_ADMIN},
        headers=basic("cqrs-reverse-sync", "dev-reverse-sync-secret"),
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({"username": "alice", "password": DEMO_PASSWORD}, "grant_type"),
        ({"grant_type": "password", "password": DEMO_PASSWORD}, "username"),
        ({"grant_type": "password", "username": "alice"}, "password"),
        ({"grant_type": "password", "username": "", "password": DEMO_PASSWORD}, "username"),
    ],
)
async def test_missing_field_named(
    client: httpx.AsyncClient, form: dict[str, str], field: str
) -> None:
    response = await client.post("/token", data=form)

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert repr(field) in response.json()["error_description"]


async def test_unsupported_grant_type(client: httpx.AsyncClient) -> None:
    response = await client.post("/token", data={"grant_type": "authorization_code"})

    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"
    assert "authorization_code" in response.json()["error_description"]


async def test_json_body_rejected(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/token", json={"grant_type": "password", "username": "alice", "password": DEMO_PASSWORD}
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "application/x-www-form-urlencoded" in response.json()["error_description"]


async def test_repeated_parameter_rejected(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/token",
        content="grant_type=password&username=alice&username=bob&password=demo-pass",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "'username'" in response.json()["error_description"]


async def test_oversized_parameter_rejected(client: httpx.AsyncClient) -> None:
    response = await password_token(client, "alice", "x" * 5000)

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "'password'" in response.json()["error_description"]


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [("cqrs-reverse-sync", "wrong-secret"), ("no-such-client", "dev-reverse-sync-secret")],
)
async def test_client_wrong_secret_401(
    client: httpx.AsyncClient, client_id: str, secret: str
) -> None:
    response = await client.post(
        "/token", data={"grant_type": "client_credentials"}, headers=basic(client_id, secret)
    )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert response.headers["www-authenticate"].startswith("Basic")
    assert response.headers["cache-control"] == "no-store"


async def test_client_credentials_missing_secret(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/token", data={"grant_type": "client_credentials", "client_id": "cqrs-reverse-sync"}
    )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert "client_secret" in response.json()["error_description"]


async def test_public_client_no_client_credentials(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/token",
        data={"grant_type": "client_credentials"},
        headers=basic("ztcqrs-web", "anything-at-all"),
    )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


async def test_service_client_no_password_grant(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/token",
        data={"grant_type": "password", "username": "alice", "password": DEMO_PASSWORD},
        headers=basic("cqrs-reverse-sync", "dev-reverse-sync-secret"),
    )

    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"


async def test_two_client_auth_methods_rejected(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/token",
        data={"grant_type": "client_credentials", "client_secret": "dev-reverse-sync-secret"},
        headers=basic("cqrs-reverse-sync", "dev-reverse-sync-secret"),
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_unknown_password_client_401(client: httpx.AsyncClient) -> None:
    response = await password_token(client, "alice", client_id="no-such-client")

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


async def test_jwks_published(client: httpx.AsyncClient) -> None:
    response = await client.get("/.well-known/jwks.json")

    assert response.status_code == 200
    assert "max-age=60" in response.headers["cache-control"]
    keys = response.json()["keys"]
    assert len(keys) == 1
    key = keys[0]
    assert key["kty"] == "RSA"
    assert key["use"] == "sig"
    assert key["alg"] == "RS256"
    assert "d" not in key
    assert "p" not in key


async def test_discovery_documents(client: httpx.AsyncClient) -> None:
    for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
        response = await client.get(path)

        assert response.status_code == 200
        document = response.json()
        assert document["issuer"] == ISSUER
        assert document["token_endpoint"] == f"{ISSUER}/token"
        assert document["jwks_uri"] == f"{ISSUER}/.well-known/jwks.json"
        assert set(document["grant_types_supported"]) == {"password", "client_credentials"}
        assert "client_secret_basic" in document["token_endpoint_auth_methods_supported"]


async def test_readyz_without_jwks(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_token_issued_log_has_no_token(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="services.auth")
    response = await password_token(client, "alice")
    token = response.json()["access_token"]

    issued = [record for record in caplog.records if record.getMessage() == "token issued"]
    assert len(issued) == 1
    record = issued[0]
    assert record.__dict__["sub"] == "alice"
    assert record.__dict__["client_id"] == "ztcqrs-web"
    assert record.__dict__["jti"] == jwt.decode(token, options={"verify_signature": False})["jti"]
    for logged in caplog.records:
        assert token not in logged.getMessage()
        assert token not in str(logged.__dict__)


async def test_failed_login_logged(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="services.auth")
    await password_token(client, "alice", "not-the-password")
    await password_token(client, "mallory", "not-the-password")

    failures = [record for record in caplog.records if record.getMessage() == "login failed"]
    reasons = {record.__dict__["username"]: record.__dict__["reason"] for record in failures}
    assert reasons == {"alice": "wrong_password", "mallory": "unknown_user"}
    for record in failures:
        assert "not-the-password" not in str(record.__dict__)
