"""Every service verifies every request itself: bad tokens get 401, missing scopes 403, and the
router never forwards internal routes."""

import time
import uuid
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import SigningKey

from .conftest import Platform


def platform_claims(platform: Platform, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": platform.issuer,
        "aud": "ztcqrs-api",
        "sub": "bob",
        "username": "bob",
        "client_id": "ztcqrs-web",
        "scope": "orders:read orders:write products:read",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return claims


def sign_with_platform_key(platform: Platform, claims: dict[str, Any]) -> str:
    """Sign with the platform's own development key, so only the claims make the token bad."""
    key = serialization.load_pem_private_key(platform.signing_key_pem(), password=None)
    kid = httpx.get(f"{platform.url('auth')}/.well-known/jwks.json", timeout=5).json()["keys"][0][
        "kid"
    ]
    return jwt.encode(
        claims,
        key,
        algorithm="RS256",  # type: ignore[arg-type]
        headers={"kid": kid, "typ": "at+jwt"},
    )


def bad_tokens(platform: Platform) -> dict[str, str]:
    now = int(time.time())
    other_key = SigningKey()
    return {
        "expired": sign_with_platform_key(
            platform, platform_claims(platform, iat=now - 900, exp=now - 600)
        ),
        "other key": other_key.token("bob"),
        "wrong audience": sign_with_platform_key(platform, platform_claims(platform, aud="other")),
        "garbage": "not.a.token",
    }


@pytest.mark.parametrize("service", ["router", "monolith", "cqrs"])
def test_missing_token_rejected(platform: Platform, service: str) -> None:
    path = "/queries/orders" if service == "cqrs" else "/orders"
    response = httpx.get(f"{platform.url(service)}{path}", timeout=5)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


@pytest.mark.parametrize("service", ["router", "monolith", "cqrs"])
def test_bad_tokens_rejected(platform: Platform, service: str) -> None:
    path = "/queries/orders" if service == "cqrs" else "/orders"
    for name, token in bad_tokens(platform).items():
        response = httpx.get(
            f"{platform.url(service)}{path}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        assert response.status_code == 401, (service, name, response.text)


def test_control_token_accepted(platform: Platform) -> None:
    token = sign_with_platform_key(platform, platform_claims(platform))
    response = httpx.get(
        f"{platform.url('router')}/orders", headers={"Authorization": f"Bearer {token}"}, timeout=5
    )
    assert response.status_code == 200


def test_missing_scope_forbidden(platform: Platform) -> None:
    read_only = {"Authorization": f"Bearer {platform.token('bob', scope='products:read')}"}
    body = {"items": [{"product_id": "prod-cable", "quantity": 1}]}
    through_router = httpx.post(
        f"{platform.url('router')}/orders", json=body, headers=read_only, timeout=5
    )
    assert through_router.status_code == 403
    assert through_router.json()["error"] == "insufficient_scope"
    direct = httpx.post(
        f"{platform.url('cqrs')}/commands/orders", json=body, headers=read_only, timeout=5
    )
    assert direct.status_code == 403


@pytest.mark.parametrize(
    "path",
    [
        "/internal/sync/orders/x",
        "/orders/../internal/sync/orders/x",
        "/%2e%2e/internal/sync/orders/x",
        "//internal/sync/orders/x",
    ],
)
def test_router_never_forwards_internal(platform: Platform, bob: dict[str, str], path: str) -> None:
    admin = platform.client_token("cqrs-reverse-sync", "dev-reverse-sync-secret")
    response = httpx.put(
        f"{platform.url('router')}{path}",
        json={},
        headers={"Authorization": f"Bearer {admin}"},
        timeout=5,
    )
    assert response.status_code in (400, 404)
    assert response.headers.get("X-Gray-Target") == "router"


def test_sync_api_rejects_user_token(platform: Platform, bob: dict[str, str]) -> None:
    response = httpx.put(
        f"{platform.url('monolith')}/internal/sync/orders/x",
        json={"state": {}, "event_id": "e"},
        headers=bob,
        timeout=5,
    )
    assert response.status_code == 403
