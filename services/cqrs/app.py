"""HTTP API of the CQRS service: commands on the write model, queries on the Redis read model.

Routes, scopes, status codes and bodies match the monolith's public API, so a request gets the same
response whichever side the router sends it to. Command responses carry `X-Consistency-Token:
<order id>@<version>`, and so do the monolith's. A query that sends it back waits up to
`read_wait_ms` for the read model to reach that version. When the read model is still behind, it
waits up to `read_wait_ms` more for the write model, because a token from a monolith write can
name a version that CDC ingest has not applied yet, and then reads the write model.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import redis.asyncio as redis
from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from sqlalchemy import Engine, text
from starlette.concurrency import run_in_threadpool

from services.shared.consistency_token import (
    CONSISTENCY_HEADER,
    ConsistencyToken,
    parse_consistency_token,
    wait_for_version,
)
from services.shared.domain import (
    OrderCreate,
    OrderList,
    OrderPublic,
    ProductList,
    ProductPublic,
    order_not_found,
)
from services.shared.errors import NotFound
from services.shared.reconciliation import install_reconcile_metrics
from services.shared.scopes import ORDERS_READ, ORDERS_WRITE, PRODUCTS_READ
from services.shared.security import JWKSClient, KeySource, Principal, TokenVerifier
from services.shared.streams import connect
from services.shared.web import (
    ReadinessCheck,
    install_common,
    install_health_metrics,
    require_scope,
)

from . import commands, digests, read_model, write_model
from .schema import open_write_model
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Resources:
    """Connections one app instance owns; closed when the app shuts down."""

    settings: Settings
    engine: Engine
    redis: "redis.Redis"
    jwks_client: JWKSClient | None

    async def aclose(self) -> None:
        await self.redis.aclose()
        self.engine.dispose()
        if self.jwks_client is not None:
            await self.jwks_client.aclose()


def resources_of(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


AppResources = Annotated[Resources, Depends(resources_of)]
OrderWriter = Annotated[Principal, Depends(require_scope(ORDERS_WRITE))]
OrderReader = Annotated[Principal, Depends(require_scope(ORDERS_READ))]
ProductReader = Annotated[Principal, Depends(require_scope(PRODUCTS_READ))]
ConsistencyHeader = Annotated[str | None, Header(alias=CONSISTENCY_HEADER)]

router = APIRouter()


def _set_consistency_token(response: Response, state: dict[str, Any]) -> None:
    response.headers[CONSISTENCY_HEADER] = str(ConsistencyToken(state["id"], state["version"]))


@router.post("/commands/orders", status_code=201, response_model=OrderPublic)
async def create_order(
    body: OrderCreate, principal: OrderWriter, resources: AppResources, request: Request,
    response: Response,
) -> dict[str, Any]:
    state = await run_in_threadpool(
        commands.create_order, resources.engine, user_id=principal.subject, request=body,
        traceparent=commands.valid_traceparent(request.headers.get("traceparent")),
    )
    log.info("order created", extra={"order_id": state["id"], "user_id": principal.subject})
    _set_consistency_token(response, state)
    return state


@router.post("/commands/orders/{order_id}/{action}", response_model=OrderPublic)
async def change_order_status(
    order_id: str, action: str, principal: OrderWriter, resources: AppResources,
    request: Request, response: Response,
) -> dict[str, Any]:
    state = await run_in_threadpool(
        commands.transition_order, resources.engine, order_id=order_id,
        user_id=principal.subject, action=action,
        traceparent=commands.valid_traceparent(request.headers.get("traceparent")),
    )
    log.info(
        "order status changed",
        extra={"order_id": order_id, "action": action, "status": state["status"],
               "version": state["version"]},
    )
    _set_consistency_token(response, state)
    return state


async def _caught_up(resources: Resources, token: ConsistencyToken) -> bool:
    timeout = resources.settings.read_wait_ms / 1000
    reached = await read_model.wait_for_order_version(
        resources.redis, token.order_id, token.version, timeout
    )
    if not reached:
        log.info(
            "read model behind the consistency token; reading the write model",
            extra={"order_id": token.order_id, "version": token.version,
                   "read_wait_ms": resources.settings.read_wait_ms},
        )
    return reached


async def _wait_for_write_model(
    resources: Resources, token: ConsistencyToken
) -> dict[str, Any] | None:
    """Return the write model's state of the token's order once it reaches the token's version.

    After `read_wait_ms` without that version, return the write model's state (None when it
    does not contain the order).
    """
    state: dict[str, Any] | None = None

    async def load_version() -> int | None:
        nonlocal state
        state = await run_in_threadpool(write_model.load_order, resources.engine, token.order_id)
        return None if state is None else int(state["version"])

    timeout = resources.settings.read_wait_ms / 1000
    if not await wait_for_version(load_version, token.version, timeout):
        held = None if state is None else state["version"]
        log.warning(
            "write model behind the consistency token after the wait; returning the stored state",
            extra={"order_id": token.order_id, "version": token.version, "held_version": held,
                   "read_wait_ms": resources.settings.read_wait_ms},
        )
    return state


async def _order_at_token(resources: Resources, token: ConsistencyToken) -> dict[str, Any] | None:
    """Return the token's order from the read model once it caught up, else from the write model."""
    if await _caught_up(resources, token):
        state = await read_model.read_order(resources.redis, token.order_id)
        if state is not None:
            return state
    state = await _wait_for_write_model(resources, token)
    if state is None:
        # The projector reads the monolith's changes itself, so the read model can hold an order
        # that CDC ingest has not written yet.
        state = await read_model.read_order(resources.redis, token.order_id)
    return state


@router.get("/queries/orders/{order_id}", response_model=OrderPublic)
async def get_order(
    order_id: str, principal: OrderReader, resources: AppResources,
    consistency_token: ConsistencyHeader = None,
) -> dict[str, Any]:
    token = parse_consistency_token(consistency_token)
    state: dict[str, Any] | None
    # The token's version applies to its own order only, so a token for another order is ignored.
    if token is not None and token.order_id == order_id:
        state = await _order_at_token(resources, token)
    else:
        state = await read_model.read_order(resources.redis, order_id)
        if state is None:
            # The read model has not projected the order yet. A just-created order must not
            # return 404, so the write model decides.
            state = await run_in_threadpool(write_model.load_order, resources.engine, order_id)
    if state is None or state["user_id"] != principal.subject:
        raise order_not_found(order_id)
    return state


@router.get("/queries/orders", response_model=OrderList)
async def list_orders(
    principal: OrderReader, resources: AppResources, consistency_token: ConsistencyHeader = None,
) -> dict[str, Any]:
    token = parse_consistency_token(consistency_token)
    if token is not None and not await _caught_up(resources, token):
        await _wait_for_write_model(resources, token)
        orders = await run_in_threadpool(
            write_model.list_orders, resources.engine, principal.subject
        )
    else:
        orders = await read_model.list_user_orders(resources.redis, principal.subject)
    return {"orders": orders}


@router.get("/queries/products", response_model=ProductList)
async def list_products(_principal: ProductReader, resources: AppResources) -> dict[str, Any]:
    products = await read_model.list_products(resources.redis)
    if not products:
        products = await run_in_threadpool(write_model.list_products, resources.engine)
    return {"products": products}


@router.get("/queries/products/{product_id}", response_model=ProductPublic)
async def get_product(
    product_id: str, _principal: ProductReader, resources: AppResources
) -> dict[str, Any]:
    product = await read_model.read_product(resources.redis, product_id)
    if product is None:
        product = await run_in_threadpool(write_model.load_product, resources.engine, product_id)
    if product is None:
        raise NotFound(
            f"Product {product_id!r} was not found; GET /products lists the catalogue."
        )
    return product


def _readiness_checks(resources: Resources) -> dict[str, ReadinessCheck]:
    def ping_database() -> None:
        with write_model.reading(resources.engine) as connection:
            connection.execute(text("SELECT 1"))

    async def check_database() -> None:
        await run_in_threadpool(ping_database)

    async def check_redis() -> None:
        await resources.redis.ping()

    async def check_jwks() -> None:
        client = resources.jwks_client
        if client is None or client.loaded:
            return
        await client.refresh(force=False)
        if not client.loaded:
            raise RuntimeError(f"No signing keys loaded from {client.url}; is the auth server up?")

    return {"db": check_database, "redis": check_redis, "jwks": check_jwks}


def create_app(settings: Settings, *, key_source: KeySource | None = None) -> FastAPI:
    """Build the CQRS service app; `key_source` replaces the JWKS client, for tests."""
    jwks_client: JWKSClient | None = None
    if key_source is None:
        jwks_client = JWKSClient(
            settings.jwks_url,
            refresh_seconds=settings.jwks_refresh_seconds,
            min_refresh_seconds=settings.jwks_min_refresh_seconds,
            max_stale_seconds=settings.jwks_max_stale_seconds,
        )
        key_source = jwks_client
    resources = Resources(
        settings=settings,
        engine=open_write_model(settings),
        redis=connect(settings.redis_url),
        jwks_client=jwks_client,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if jwks_client is not None:
            # A failed fetch is logged and the service still starts, because keys load on demand.
            await jwks_client.refresh()
        log.info(
            "cqrs service started",
            extra={"host": settings.host, "port": settings.port,
                   "database_path": str(settings.database_file), "phase": settings.phase.value},
        )
        try:
            yield
        finally:
            await resources.aclose()
            log.info("cqrs service stopped")

    app = FastAPI(title="ztcqrs CQRS service", lifespan=lifespan)
    app.state.resources = resources
    # The revocation list that install_common adds reads its Redis URL from these settings.
    app.state.settings = settings
    app.state.verifier = TokenVerifier(
        key_source,
        issuer=settings.token_issuer,
        audience=settings.token_audience,
        leeway_seconds=settings.token_leeway_seconds,
    )
    install_common(app, service="cqrs", checks=_readiness_checks(resources))
    install_health_metrics(app, resources.redis)
    install_reconcile_metrics(app, resources.redis)
    app.include_router(router)
    app.include_router(digests.router)
    return app
