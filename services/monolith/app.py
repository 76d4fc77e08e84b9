"""The monolith's FastAPI application: public order and product API plus the internal sync API."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import Engine, text

from services.shared.security import JWKSClient, KeySource, TokenVerifier
from services.shared.streams import connect
from services.shared.web import ReadinessCheck, install_common, install_health_metrics

from . import digests, routes, sync
from .schema import open_database
from .settings import Settings

log = logging.getLogger(__name__)


def _check_database(engine: Engine) -> ReadinessCheck:
    def select_one() -> None:
        with engine.connect() as connection:
            connection.execution_options(sqlite_begin="DEFERRED")
            connection.execute(text("SELECT 1 FROM change_log LIMIT 1"))

    async def check() -> None:
        await asyncio.to_thread(select_one)

    return check


def _check_jwks(client: JWKSClient) -> ReadinessCheck:
    async def check() -> None:
        if not client.loaded:
            await client.refresh(force=False)
        if not client.loaded:
            raise RuntimeError(f"no signing keys loaded from {client.url}")

    return check


def create_app(settings: Settings, *, key_source: KeySource | None = None) -> FastAPI:
    """Build the app; without `key_source`, keys come from the JWKS at `settings.jwks_url`.

    Opening the app creates the database schema, and in development mode seeds the demo users and
    products.
    """
    owns_key_source = key_source is None
    if key_source is None:
        key_source = JWKSClient(
            settings.jwks_url,
            refresh_seconds=settings.jwks_refresh_seconds,
            min_refresh_seconds=settings.jwks_min_refresh_seconds,
            max_stale_seconds=settings.jwks_max_stale_seconds,
        )
    jwks_client = key_source if isinstance(key_source, JWKSClient) else None
    engine = open_database(settings, seed=settings.development)
    # Read only by /metrics for the migration's lag gauges; the monolith keeps no data in Redis.
    health_redis = connect(settings.redis_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if jwks_client is not None:
            # A failed fetch is logged by the client and retried on the first token, so the
            # monolith can start before the auth server does.
            await jwks_client.refresh()
        log.info(
            "monolith started",
            extra={"database": str(settings.resolved_database_path), "phase": settings.phase.value},
        )
        try:
            yield
        finally:
            if jwks_client is not None and owns_key_source:
                await jwks_client.aclose()
            engine.dispose()
            await health_redis.aclose()
            log.info("monolith stopped")

    app = FastAPI(title="ztcqrs monolith", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.verifier = TokenVerifier(
        key_source,
        issuer=settings.token_issuer,
        audience=settings.token_audience,
        leeway_seconds=settings.token_leeway_seconds,
    )
    checks: dict[str, ReadinessCheck] = {"database": _check_database(engine)}
    if jwks_client is not None:
        checks["jwks"] = _check_jwks(jwks_client)
    install_common(app, service="monolith", checks=checks)
    install_health_metrics(app, health_redis)
    app.include_router(routes.router)
    app.include_router(sync.router)
    app.include_router(digests.router)
    return app
