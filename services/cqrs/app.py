"""HTTP API of the CQRS service: commands on the write model, queries on the Redis read model.

Routes, scopes, status codes and bodies match the monolith's public API, so a request gets the same
response whichever side the router sends it to. Command responses carry `X-Consistency-Token:
<order id>@<version>`. A query that sends it back waits up to `read_wait_ms` for the read model to
reach that version, and otherwise reads the write model.
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

from services.shared.domain import (
    OrderCreate,
    OrderList,
    OrderPublic,
    ProductList,
    ProductPublic,
    order_not_found,
)
from services.shared.errors import NotFound
from services.shared.scopes import ORDERS_READ, ORDERS_WRITE, PRODUCTS_READ
from services.shared.security import JWKSClient, KeySource, Principal, TokenVerifier
from services.shared.streams import connect
from services.shared.web import ReadinessCheck, install_common, require_scope

from . import commands, read_model, write_model
from .schema import open_write_model
from .settings import Settings

log = logging.getLogger(__name__)

CONSISTENCY_HEADER = "X-Consistency-Token"


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


@dataclass(frozen=True)
class ConsistencyToken:
    order_id: str
    version: int

    def __str__(self) -> str:
        return f"{self.order_id}@{self.version}"


def parse_consistency_token(value: str | None) -> ConsistencyToken | None:
    """Parse `<order id>@<version>`; return None for a missing or malformed value.

    A malformed token is ignored rather than rejected, because the monolith ignores the header and
    the same request must get the same status code from either side.
    """
    if not value:
        return None
    order_id, _, version = value.strip().rpartition("@")
    if not order_id or not version.isdigit():
        log.warning("ignoring malformed consistency token", extra={"token": value[:200]})
        return None
    return ConsistencyToken(order_id, int(version))


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


@router.get("/queries/orders/{order_id}", response_model=OrderPublic)
async def get_order(
    order_id: str, principal: OrderReader, resources: AppResources,
    consistency_token: ConsistencyHeader = None,
) -> dict[str, Any]:
    token = parse_consistency_token(consistency_token)
    state: dict[str, Any] | None = None
    # The token's version applies to its own order only, so a token for another order is ignored.
    if token is None or token.order_id != order_id or await _caught_up(resources, token):
        state = await read_model.read_order(resources.redis, order_id)
    if state is None:
        # The read model is behind the token or has not projected the order yet. A just-created
        # order must not return 404, so the write model decides.
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
    app.include_router(router)
    return app
