"""The monolith's public API: orders and products, as listed in docs/architecture.md.

Write handlers are plain functions, so FastAPI runs them in its thread pool and SQLite calls never
block the event loop. Each write is one `BEGIN IMMEDIATE` transaction, and its response carries
`X-Consistency-Token: <order id>@<version>`. Order reads are async because a read that sends such
a token back waits, up to `read_wait_ms`, until this database contains the order at that version: a
write on the CQRS side reaches the monolith asynchronously through the reverse sync. Each check
of the version runs in the thread pool on a DEFERRED connection, so the wait takes no write lock.
"""

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from services.shared.clock import utc_now
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
    OrderStatus,
    ProductList,
    ProductPublic,
    next_status,
    order_not_found,
    price_items,
)
from services.shared.errors import NotFound
from services.shared.scopes import ORDERS_READ, ORDERS_WRITE, PRODUCTS_READ
from services.shared.security import Principal
from services.shared.web import require_scope

from . import store
from .settings import Settings

log = logging.getLogger(__name__)

router = APIRouter()

OrdersReader = Annotated[Principal, Depends(require_scope(ORDERS_READ))]
OrdersWriter = Annotated[Principal, Depends(require_scope(ORDERS_WRITE))]
ProductsReader = Annotated[Principal, Depends(require_scope(PRODUCTS_READ))]


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


DatabaseEngine = Annotated[Engine, Depends(engine_of)]
MonolithSettings = Annotated[Settings, Depends(settings_of)]
ConsistencyHeader = Annotated[str | None, Header(alias=CONSISTENCY_HEADER)]


def _set_consistency_token(response: Response, order: OrderPublic) -> None:
    response.headers[CONSISTENCY_HEADER] = str(ConsistencyToken(order.id, order.version))


def _load_order(engine: Engine, order_id: str) -> OrderPublic | None:
    with store.read_connection(engine) as connection:
        return store.get_order(connection, order_id)


async def _wait_for_order(
    engine: Engine, token: ConsistencyToken, read_wait_ms: int
) -> OrderPublic | None:
    """Return the token's order once this database contains its version, or the stored state after
    `read_wait_ms` (None when the order has not arrived)."""
    order: OrderPublic | None = None

    async def load_version() -> int | None:
        nonlocal order
        order = await run_in_threadpool(_load_order, engine, token.order_id)
        return None if order is None else order.version

    if not await wait_for_version(load_version, token.version, read_wait_ms / 1000):
        log.warning(
            "monolith behind the consistency token after the wait; returning the stored state",
            extra={"order_id": token.order_id, "version": token.version,
                   "held_version": None if order is None else order.version,
                   "read_wait_ms": read_wait_ms},
        )
    return order


@router.post("/orders", status_code=201)
def create_order(
    body: OrderCreate, principal: OrdersWriter, engine: DatabaseEngine, response: Response
) -> OrderPublic:
    now = utc_now()
    with engine.begin() as connection:
        prices = store.product_prices(connection, [item.product_id for item in body.items])
        items, total = price_items(body.items, prices)
        order = OrderPublic.model_validate(
            {
                "id": uuid.uuid4().hex,
                "user_id": principal.subject,
                "items": items,
                "total_amount": total,
                "status": OrderStatus.PENDING,
                "version": 1,
                "created_at": now,
                "updated_at": now,
            }
        )
        store.insert_order(connection, order)
    log.info(
        "order created",
        extra={"order_id": order.id, "user_id": order.user_id, "total_amount": total},
    )
    _set_consistency_token(response, order)
    return order


def _list_user_orders(engine: Engine, user_id: str) -> OrderList:
    with store.read_connection(engine) as connection:
        return OrderList(orders=store.list_user_orders(connection, user_id))


@router.get("/orders")
async def list_orders(
    principal: OrdersReader, engine: DatabaseEngine, settings: MonolithSettings,
    consistency_token: ConsistencyHeader = None,
) -> OrderList:
    token = parse_consistency_token(consistency_token)
    if token is not None:
        await _wait_for_order(engine, token, settings.read_wait_ms)
    return await run_in_threadpool(_list_user_orders, engine, principal.subject)


@router.get("/orders/{order_id}")
async def get_order(
    order_id: str, principal: OrdersReader, engine: DatabaseEngine, settings: MonolithSettings,
    consistency_token: ConsistencyHeader = None,
) -> OrderPublic:
    token = parse_consistency_token(consistency_token)
    order: OrderPublic | None
    # The token's version applies to its own order only, so a token for another order is ignored.
    if token is not None and token.order_id == order_id:
        order = await _wait_for_order(engine, token, settings.read_wait_ms)
    else:
        order = await run_in_threadpool(_load_order, engine, order_id)
    if order is None or order.user_id != principal.subject:
        raise order_not_found(order_id)
    return order


@router.post("/orders/{order_id}/{action}")
def change_order_status(
    order_id: str, action: str, principal: OrdersWriter, engine: DatabaseEngine,
    response: Response,
) -> OrderPublic:
    with engine.begin() as connection:
        order = store.get_order(connection, order_id)
        if order is None or order.user_id != principal.subject:
            raise order_not_found(order_id)
        status = next_status(order_id, order.status, action)
        changed = order.model_copy(
            update={"status": status, "version": order.version + 1, "updated_at": utc_now()}
        )
        store.update_order_status(
            connection, order_id, status=status, version=changed.version,
            updated_at=changed.updated_at,
        )
    log.info(
        "order status changed",
        extra={"order_id": order_id, "action": action, "status": status.value,
               "version": changed.version},
    )
    _set_consistency_token(response, changed)
    return changed


@router.get("/products")
def list_products(principal: ProductsReader, engine: DatabaseEngine) -> ProductList:
    with store.read_connection(engine) as connection:
        return ProductList(products=store.list_products(connection))


@router.get("/products/{product_id}")
def get_product(
    product_id: str, principal: ProductsReader, engine: DatabaseEngine
) -> ProductPublic:
    with store.read_connection(engine) as connection:
        product = store.get_product(connection, product_id)
    if product is None:
        raise NotFound(f"Product {product_id!r} was not found; GET /products lists the catalogue.")
    return product
