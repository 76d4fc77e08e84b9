"""The monolith's public API: orders and products, as listed in docs/architecture.md.

Handlers are plain functions, so FastAPI runs them in its thread pool and SQLite calls never block
the event loop. Each write is one `BEGIN IMMEDIATE` transaction.
"""

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sqlalchemy import Engine

from services.shared.clock import utc_now
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

log = logging.getLogger(__name__)

router = APIRouter()

OrdersReader = Annotated[Principal, Depends(require_scope(ORDERS_READ))]
OrdersWriter = Annotated[Principal, Depends(require_scope(ORDERS_WRITE))]
ProductsReader = Annotated[Principal, Depends(require_scope(PRODUCTS_READ))]


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


DatabaseEngine = Annotated[Engine, Depends(engine_of)]


@router.post("/orders", status_code=201)
def create_order(body: OrderCreate, principal: OrdersWriter, engine: DatabaseEngine) -> OrderPublic:
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
    return order


@router.get("/orders")
def list_orders(principal: OrdersReader, engine: DatabaseEngine) -> OrderList:
    with store.read_connection(engine) as connection:
        return OrderList(orders=store.list_user_orders(connection, principal.subject))


@router.get("/orders/{order_id}")
def get_order(order_id: str, principal: OrdersReader, engine: DatabaseEngine) -> OrderPublic:
    with store.read_connection(engine) as connection:
        order = store.get_order(connection, order_id)
    if order is None or order.user_id != principal.subject:
        raise order_not_found(order_id)
    return order


@router.post("/orders/{order_id}/{action}")
def change_order_status(
    order_id: str, action: str, principal: OrdersWriter, engine: DatabaseEngine
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
