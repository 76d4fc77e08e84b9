"""Service identities: the internal sync API of the real monolith accepts only a service token of
the reverse-sync client with the sync scope. A user token never passes, whatever it claims."""

import httpx
import jwt
import pytest

from .conftest import Forge, SecurityPlatform

SYNC_PATH = "/internal/sync/orders/identity-test"


def sync_status(platform: SecurityPlatform, token: str) -> httpx.Response:
    return httpx.put(
        f"{platform.url('monolith')}{SYNC_PATH}",
        headers={"Authorization": f"Bearer {token}"},
        json={},
        timeout=5,
    )


FORGED = {
    "user token with sync scope": {"scope": "sync:write"},
    "user token of the sync client": {"scope": "sync:write", "client_id": "cqrs-reverse-sync"},
    "sync client subject with a username": {
        "sub": "cqrs-reverse-sync", "client_id": "cqrs-reverse-sync", "scope": "sync:write",
        "username": "bob",
    },
    "service token of another client": {
        "sub": "ztcqrs-admin", "client_id": "ztcqrs-admin", "scope": "sync:write",
        "username": None,
    },
    "sync client without the sync scope": {
        "sub": "cqrs-reverse-sync", "client_id": "cqrs-reverse-sync",
        "scope": "orders:read orders:write", "username": None,
    },
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_sync_api_rejects_forged_identity(
    security_platform: SecurityPlatform, forge: Forge, case: str
) -> None:
    response = sync_status(security_platform, forge.token(**FORGED[case]))

    assert response.status_code == 403, response.text
    assert response.json()["error"] == "insufficient_scope"


def test_sync_api_rejects_user_token(security_platform: SecurityPlatform) -> None:
    response = sync_status(security_platform, security_platform.token("alice"))

    assert response.status_code == 403


def test_sync_api_rejects_admin_client(security_platform: SecurityPlatform) -> None:
    admin = security_platform.client_token("ztcqrs-admin", "dev-admin-secret")

    assert sync_status(security_platform, admin).status_code == 403


def test_sync_api_admits_sync_client(security_platform: SecurityPlatform) -> None:
    token = security_platform.client_token("cqrs-reverse-sync", "dev-reverse-sync-secret")
    claims = jwt.decode(token, options={"verify_signature": False})

    response = sync_status(security_platform, token)

    # Past authentication and authorisation: the empty body fails validation.
    assert response.status_code == 422
    assert claims["client_id"] == claims["sub"] == "cqrs-reverse-sync"
    assert claims["scope"] == "sync:write"
    assert "username" not in claims


def test_user_cannot_request_sync_scope(security_platform: SecurityPlatform) -> None:
    response = httpx.post(
        f"{security_platform.url('auth')}/token",
        data={
            "grant_type": "password", "username": "bob", "password": "demo-pass",
            "scope": "sync:write",
        },
        timeout=5,
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"


def test_router_never_forwards_internal(security_platform: SecurityPlatform) -> None:
    token = security_platform.client_token("cqrs-reverse-sync", "dev-reverse-sync-secret")

    response = httpx.put(
        f"{security_platform.url('router')}{SYNC_PATH}",
        headers={"Authorization": f"Bearer {token}"},
        json={},
        timeout=5,
    )

    assert response.status_code == 404
    assert response.headers["x-gray-target"] == "router"
