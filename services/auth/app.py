"""The auth server: `POST /token`, the JWKS and the discovery documents.

Start-up loads (or in development mode creates) the signing key, opens the user store and seeds it,
so a misconfigured server fails before it accepts connections. The auth server verifies no
tokens itself, so it needs no JWKS to become ready.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import SecretStr

from services.shared.errors import ValidationFailed
from services.shared.scopes import GRAY_ADMIN, REVERSE_SYNC_CLIENT, SYNC_WRITE, USER_SCOPES
from services.shared.security import TokenVerifier
from services.shared.settings import require_secret
from services.shared.streams import connect
from services.shared.web import install_common

from .grants import FailureLimits, TokenEndpoint
from .revoke import RevocationEndpoint
from .rotation import KeyStore
from .settings import Settings
from .store import ADMIN_CLIENT, GRANT_TYPES, AuthStore, open_store
from .throttle import LoginThrottle
from .tokens import RingKeySource, TokenMinter

log = logging.getLogger(__name__)

SERVICE_NAME = "auth"
JWKS_PATH = "/.well-known/jwks.json"
TOKEN_PATH = "/token"  # noqa: S105 - a route, not a secret
REVOKE_PATH = "/revoke"
JWKS_MAX_AGE_SECONDS = 60


def create_app(settings: Settings) -> FastAPI:
    """Build the auth server's application.

    Raises `SigningKeyError` when the signing key is missing in production mode or unusable, and
    `ValueError` naming the setting when a configured client secret is rejected.
    """
    _warn_on_verifier_mismatch(settings)
    keys = KeyStore(
        settings.resolved_signing_key_file,
        create_if_missing=settings.development,
        retention_seconds=settings.key_retention_seconds,
        reload_seconds=settings.keys_reload_seconds,
    )
    store = open_store(settings)
    try:
        seed_store(store, settings)
    except Exception:
        store.engine.dispose()
        raise
    minter = TokenMinter(
        keys,
        issuer=settings.issuer,
        audience=settings.audience,
        ttl_seconds=settings.token_ttl_seconds,
    )
    # Login throttling and revocations share one Redis client; it connects on first use, so the
    # auth server starts and issues tokens while Redis is down.
    redis_client = connect(settings.redis_url)
    throttle = LoginThrottle(redis_client, window_seconds=settings.login_failure_window_seconds)
    limits = FailureLimits(
        per_account=settings.login_max_failures_per_account,
        per_address=settings.login_max_failures_per_address,
    )
    token_endpoint = TokenEndpoint(store, minter, throttle, limits)
    own_tokens = TokenVerifier(
        RingKeySource(keys),
        issuer=settings.issuer,
        audience=settings.audience,
        leeway_seconds=settings.token_leeway_seconds,
    )
    revocation_endpoint = RevocationEndpoint(
        token_endpoint, own_tokens, redis_client, retention_seconds=settings.key_retention_seconds
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        keys.start()
        log.info(
            "auth service started",
            extra={
                "issuer": settings.issuer,
                "audience": settings.audience,
                "kid": keys.current.active.kid,
                "database_path": str(settings.resolved_database_path),
                "env": settings.env.value,
            },
        )
        try:
            yield
        finally:
            await keys.stop()
            await redis_client.aclose()
            store.engine.dispose()
            log.info("auth service stopped", extra={"issuer": settings.issuer})

    app = FastAPI(title="ztcqrs auth server", lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    app.state.keys = keys

    async def database_ready() -> None:
        await anyio.to_thread.run_sync(store.ping)

    async def signing_key_ready() -> None:
        _check_signing_key(keys)

    install_common(
        app,
        service=SERVICE_NAME,
        checks={"database": database_ready, "signing_key": signing_key_ready},
    )

    @app.post(TOKEN_PATH)
    async def token(request: Request) -> JSONResponse:
        """Issue an access token (RFC 6749 password and client_credentials grants)."""
        return await token_endpoint.handle(request)

    @app.post(REVOKE_PATH)
    async def revoke(request: Request) -> Response:
        """Revoke an access token until it expires (RFC 7009)."""
        return await revocation_endpoint.handle(request)

    @app.get(JWKS_PATH)
    async def jwks() -> JSONResponse:
        """Return the public keys that verify this server's tokens."""
        return JSONResponse(
            keys.current.jwks(),
            headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE_SECONDS}"},
        )

    metadata = server_metadata(settings)

    @app.get("/.well-known/openid-configuration")
    async def openid_configuration() -> dict[str, Any]:
        return metadata

    @app.get("/.well-known/oauth-authorization-server")
    async def authorization_server_metadata() -> dict[str, Any]:
        return metadata

    return app


def seed_store(store: AuthStore, settings: Settings) -> None:
    """Seed the demo accounts in development mode.

    Production mode seeds only the service clients whose secret settings are set.
    """
    reverse_sync_secret = _secret_value(
        store,
        REVERSE_SYNC_CLIENT,
        settings.reverse_sync_client_secret,
        "AUTH_REVERSE_SYNC_CLIENT_SECRET",
    )
    admin_secret = _secret_value(
        store, ADMIN_CLIENT, settings.admin_client_secret, "AUTH_ADMIN_CLIENT_SECRET"
    )
    if settings.development:
        if reverse_sync_secret is None or admin_secret is None:
            raise ValueError(
                "Development mode needs both service client secrets; leave "
                "AUTH_REVERSE_SYNC_CLIENT_SECRET and AUTH_ADMIN_CLIENT_SECRET unset to use "
                "the development defaults."
            )
        store.seed_development(reverse_sync_secret=reverse_sync_secret, admin_secret=admin_secret)
        return
    store.register_service_clients(
        reverse_sync_secret=reverse_sync_secret, admin_secret=admin_secret
    )


def _secret_value(
    store: AuthStore, client_id: str, secret: SecretStr | None, setting: str
) -> str | None:
    """Return the secret of a service client setting, or raise `ValueError` naming the setting."""
    if secret is None:
        return None
    value = require_secret(secret, setting=setting, env=store.environment).get_secret_value()
    try:
        store.validate_client_secret(client_id, value)
    except ValidationFailed as error:
        raise ValueError(f"Setting {setting} is rejected. {error.message}") from error
    return value


def server_metadata(settings: Settings) -> dict[str, Any]:
    """Return the RFC 8414 authorization server metadata, also served as OpenID discovery."""
    base = settings.issuer.rstrip("/")
    return {
        "issuer": settings.issuer,
        "token_endpoint": base + TOKEN_PATH,
        "revocation_endpoint": base + REVOKE_PATH,
        "revocation_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "none",
        ],
        "jwks_uri": base + JWKS_PATH,
        "grant_types_supported": list(GRANT_TYPES),
        # "none" is the public web client of the password grant.
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "none",
        ],
        "scopes_supported": sorted({*USER_SCOPES, SYNC_WRITE, GRAY_ADMIN}),
        # There is no authorization endpoint, so no response type is supported.
        "response_types_supported": [],
        # OpenID discovery requires this field. No ID tokens are issued, and access tokens are
        # signed with the same algorithm.
        "id_token_signing_alg_values_supported": ["RS256"],
    }


def _check_signing_key(keys: KeyStore) -> None:
    ring = keys.current
    active = ring.active
    if all(key.kid != active.kid for key in ring.published):
        raise RuntimeError(f"The active signing key {active.kid} is not in the JWKS.")


def _warn_on_verifier_mismatch(settings: Settings) -> None:
    # Every verifier rejects tokens whose `iss` or `aud` differ from its ZTCQRS_TOKEN_* settings.
    mismatched = {
        name: {"minted": minted, "verified": verified}
        for name, minted, verified in (
            ("issuer", settings.issuer, settings.token_issuer),
            ("audience", settings.audience, settings.token_audience),
        )
        if minted != verified
    }
    if mismatched:
        log.warning(
            "AUTH_ISSUER or AUTH_AUDIENCE differs from ZTCQRS_TOKEN_ISSUER or "
            "ZTCQRS_TOKEN_AUDIENCE; verifiers with the shared settings will reject these tokens",
            extra={"mismatched": mismatched},
        )
