"""Sign-out revokes a token's `jti` until it expires, and every service honours it within a
second: the platform's router, the monolith, the CQRS service and a recording router."""

import time

import httpx
import pytest

from .conftest import Forge, RecordingRouter, SecurityPlatform

PROPAGATION_LIMIT_SECONDS = 1.0


def targets(platform: SecurityPlatform, router: RecordingRouter) -> dict[str, str]:
    return {
        "router": f"{platform.url('router')}/orders",
        "monolith": f"{platform.url('monolith')}/orders",
        "cqrs": f"{platform.url('cqrs')}/queries/orders",
        "recording router": f"{router.url}/orders",
    }


def status_of(url: str, token: str) -> int:
    return httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code


def revoke(platform: SecurityPlatform, token: str, **form: str) -> httpx.Response:
    return httpx.post(
        f"{platform.url('auth')}/revoke", data={"token": token, **form}, timeout=5
    )


def test_revoked_token_rejected_everywhere(
    security_platform: SecurityPlatform, attack_router: RecordingRouter
) -> None:
    token = security_platform.token("bob")
    urls = targets(security_platform, attack_router)
    for name, url in urls.items():
        assert status_of(url, token) == 200, name
    marks = attack_router.monolith.count(), attack_router.cqrs.count()

    revoked_at = time.monotonic()
    response = revoke(security_platform, token)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"

    elapsed: dict[str, float] = {}
    pending = dict(urls)
    while pending and time.monotonic() - revoked_at < 5:
        for name, url in list(pending.items()):
            if status_of(url, token) == 401:
                elapsed[name] = time.monotonic() - revoked_at
                del pending[name]
        time.sleep(0.02)
    assert not pending, f"still accepted after 5 s: {sorted(pending)}"
    for name, seconds in elapsed.items():
        assert seconds < PROPAGATION_LIMIT_SECONDS, (name, seconds)
    assert attack_router.upstream_since(*marks) == []


def test_revoked_token_message(security_platform: SecurityPlatform) -> None:
    token = security_platform.token("bob")
    assert revoke(security_platform, token).status_code == 200
    time.sleep(PROPAGATION_LIMIT_SECONDS)

    response = httpx.get(
        f"{security_platform.url('monolith')}/orders",
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )

    assert response.status_code == 401
    assert "revoked" in response.json()["message"]


def test_other_tokens_unaffected(security_platform: SecurityPlatform) -> None:
    revoked, untouched = security_platform.token("bob"), security_platform.token("bob")
    assert revoke(security_platform, revoked).status_code == 200
    time.sleep(PROPAGATION_LIMIT_SECONDS)

    assert status_of(f"{security_platform.url('router')}/orders", untouched) == 200
    assert status_of(f"{security_platform.url('router')}/orders", revoked) == 401


@pytest.mark.parametrize(
    "token",
    ["not-a-token", "a.b.c"],
)
def test_revoke_invalid_token_ok(security_platform: SecurityPlatform, token: str) -> None:
    # RFC 7009 section 2.2: an invalid token is not an error, so callers learn nothing from it.
    assert revoke(security_platform, token).status_code == 200


def test_revoke_expired_token_ok(security_platform: SecurityPlatform, forge: Forge) -> None:
    now = int(time.time())
    assert revoke(security_platform, forge.token(iat=now - 900, exp=now - 600)).status_code == 200


def test_revoke_needs_token(security_platform: SecurityPlatform) -> None:
    response = httpx.post(f"{security_platform.url('auth')}/revoke", data={}, timeout=5)

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_revoke_other_clients_token(security_platform: SecurityPlatform) -> None:
    service = security_platform.client_token("cqrs-reverse-sync", "dev-reverse-sync-secret")

    # The public web client may not sign out a service's token.
    response = revoke(security_platform, service)

    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"
    monolith = f"{security_platform.url('monolith')}/internal/sync/orders/none"
    after = httpx.put(monolith, headers={"Authorization": f"Bearer {service}"}, json={},
                      timeout=5)
    assert after.status_code == 422


def test_service_revokes_own_token(security_platform: SecurityPlatform) -> None:
    service = security_platform.client_token("cqrs-reverse-sync", "dev-reverse-sync-secret")
    response = revoke(
        security_platform, service,
        client_id="cqrs-reverse-sync", client_secret="dev-reverse-sync-secret",
    )
    assert response.status_code == 200
    time.sleep(PROPAGATION_LIMIT_SECONDS)

    monolith = f"{security_platform.url('monolith')}/internal/sync/orders/none"
    after = httpx.put(monolith, headers={"Authorization": f"Bearer {service}"}, json={},
                      timeout=5)
    assert after.status_code == 401


def test_revoke_wrong_client_secret(security_platform: SecurityPlatform) -> None:
    service = security_platform.client_token("cqrs-reverse-sync", "dev-reverse-sync-secret")

    response = revoke(
        security_platform, service, client_id="cqrs-reverse-sync", client_secret="wrong-secret"
    )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
