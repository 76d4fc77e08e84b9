"""Order rules and public schemas that the monolith and the CQRS service must apply identically.

Both sides import this module, so a request gets the same status code and body shape whichever side
serves it. Amounts are integers in the currency's minor unit (cents).
"""

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidTransition, NotFound, ValidationFailed

MAX_ITEMS_PER_ORDER = 100
MAX_QUANTITY = 1_000


class OrderStatus(StrEnum):
    PENDING = "pending"
    PAID = "paid"
    SHIPPED = "shipped"
    CANCELLED = "cancelled"


# Each action: the statuses it may start from, and the status it leads to.
TRANSITIONS: dict[str, tuple[frozenset[OrderStatus], OrderStatus]] = {
    "pay": (frozenset({OrderStatus.PENDING}), OrderStatus.PAID),
    "ship": (frozenset({OrderStatus.PAID}), OrderStatus.SHIPPED),
    "cancel": (frozenset({OrderStatus.PENDING, OrderStatus.PAID}), OrderStatus.CANCELLED),
}


class OrderItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    product_id: str = Field(min_length=1, max_length=64)
    quantity: int = Field(ge=1, le=MAX_QUANTITY, strict=True)


class OrderCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[OrderItemIn] = Field(min_length=1, max_length=MAX_ITEMS_PER_ORDER)


class OrderItem(BaseModel):
    product_id: str
    quantity: int
    unit_price: int


class OrderPublic(BaseModel):
    id: str
    user_id: str
    items: list[OrderItem]
    total_amount: int
    status: OrderStatus
    version: int
    created_at: str
    updated_at: str


class OrderList(BaseModel):
    orders: list[OrderPublic]


class ProductPublic(BaseModel):
    id: str
    name: str
    price: int
    version: int
    updated_at: str


class ProductList(BaseModel):
    products: list[ProductPublic]


def next_status(order_id: str, current: str, action: str) -> OrderStatus:
    """Return the status `action` leads to.

    Raises 404 for an unknown action and 409 for an action the current status does not allow.
    """
    if action not in TRANSITIONS:
        raise NotFound(
            f"Order action {action!r} does not exist; use one of {', '.join(TRANSITIONS)}."
        )
    allowed_from, target = TRANSITIONS[action]
    if OrderStatus(current) not in allowed_from:
        raise InvalidTransition(
            f"Order {order_id} is {current}, so it cannot be {target}; "
            f"{action} is allowed only from {' or '.join(sorted(allowed_from))}."
        )
    return target


def price_items(
    items: list[OrderItemIn], prices: Mapping[str, int]
) -> tuple[list[dict[str, Any]], int]:
    """Price each item from the catalogue, never from the client; return the items and the total.

    `prices` maps product id to unit price. An unknown or repeated product is a 422 on its field.
    """
    priced: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        field = f"items.{index}.product_id"
        if item.product_id in seen:
            raise ValidationFailed(
                f"Product {item.product_id!r} appears twice; list each product once with its "
                "total quantity.",
                field=field,
            )
        seen.add(item.product_id)
        if item.product_id not in prices:
            raise ValidationFailed(
                f"Product {item.product_id!r} does not exist; GET /products lists the catalogue.",
                field=field,
            )
        unit_price = prices[item.product_id]
        priced.append(
            {"product_id": item.product_id, "quantity": item.quantity, "unit_price": unit_price}
        )
    total = sum(line["quantity"] * line["unit_price"] for line in priced)
    return priced, total


def order_not_found(order_id: str) -> NotFound:
    """Return the 404 for an order that does not exist or belongs to someone else.

    Both cases return the same response, so order ids of other users cannot be probed.
    """
    return NotFound(f"Order {order_id!r} was not found.")


# Demo catalogue, seeded into the monolith in development mode and reaching the CQRS side by CDC.
DEMO_PRODUCTS: tuple[dict[str, Any], ...] = (
    {"id": "prod-keyboard", "name": "Mechanical keyboard", "price": 8900},
    {"id": "prod-mouse", "name": "Wireless mouse", "price": 2900},
    {"id": "prod-monitor", "name": "27-inch monitor", "price": 25900},
    {"id": "prod-cable", "name": "USB-C cable", "price": 990},
    {"id": "prod-stand", "name": "Laptop stand", "price": 3900},
)

# Demo users; the auth server seeds their credentials, the monolith their profiles.
DEMO_USERS: tuple[dict[str, Any], ...] = (
    {"id": "alice", "username": "alice", "display_name": "Alice", "beta_tester": True},
    {"id": "bob", "username": "bob", "display_name": "Bob", "beta_tester": False},
)
