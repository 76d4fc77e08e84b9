"""Order commands on the write model. Each writes the order and its outbox event in one transaction.

The outbox event's action is `created` for a new order and the order's new status for a status
change (`paid`, `shipped`, `cancelled`), so event types read `ztcqrs.order.paid` and so on.
"""

import json
import re
import uuid
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from services.shared.clock import utc_now
from services.shared.domain import (
    OrderCreate,
    OrderPublic,
    OrderStatus,
    next_status,
    order_not_found,
    price_items,
)
from services.shared.events import Event
from services.shared.names import CQRS_STREAM, ORIGIN_CQRS

from .schema import orders, outbox, products
from .states import ORDER
from .write_model import load_state, upsert_state

EVENT_SOURCE = "/cqrs/commands"
CREATED = "created"

# W3C Trace Context `traceparent`: version, trace id, parent id, flags.
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def valid_traceparent(value: str | None) -> str | None:
    """Return `value` if it is a well-formed `traceparent` header, else None."""
    if value is not None and _TRACEPARENT.match(value):
        return value
    return None


def create_order(
    engine: Engine, *, user_id: str, request: OrderCreate, traceparent: str | None = None
) -> dict[str, Any]:
    """Create a pending order priced from the write model's catalogue and return its state.

    Raises ValidationFailed (422) naming `items.<n>.product_id` for an unknown or repeated product.
    """
    with engine.begin() as connection:
        product_ids = [item.product_id for item in request.items]
        rows = connection.execute(
            select(products.c.id, products.c.price).where(products.c.id.in_(product_ids))
        )
        prices = {row.id: row.price for row in rows}
        items, total = price_items(request.items, prices)
        now = utc_now()
        state = OrderPublic.model_validate(
            {
                "id": uuid.uuid4().hex, "user_id": user_id, "items": items,
                "total_amount": total, "status": OrderStatus.PENDING, "version": 1,
                "created_at": now, "updated_at": now,
            }
        ).model_dump(mode="json")
        upsert_state(connection, ORDER, state, origin=ORIGIN_CQRS)
        _append_to_outbox(connection, state, action=CREATED, traceparent=traceparent)
    return state


def transition_order(
    engine: Engine, *, order_id: str, user_id: str, action: str, traceparent: str | None = None
) -> dict[str, Any]:
    """Apply `action` (pay, ship, cancel) to one of the user's orders and return the new state.

    Raises NotFound (404) for an unknown action or an order that is missing or belongs to another
    user, and InvalidTransition (409) when the order's status does not allow the action.
    """
    with engine.begin() as connection:
        local = load_state(connection, ORDER, order_id)
        if local is None or local["user_id"] != user_id:
            raise order_not_found(order_id)
        status = next_status(order_id, local["status"], action)
        state = {
            **local, "status": status.value, "version": int(local["version"]) + 1,
            "updated_at": utc_now(),
        }
        connection.execute(
            update(orders)
            .where(orders.c.id == order_id)
            .values(
                status=state["status"], version=state["version"],
                updated_at=state["updated_at"], origin=ORIGIN_CQRS,
            )
        )
        _append_to_outbox(connection, state, action=status.value, traceparent=traceparent)
    return state


def _append_to_outbox(
    connection: Connection, state: dict[str, Any], *, action: str, traceparent: str | None
) -> None:
    event = Event.for_aggregate(
        source=EVENT_SOURCE, aggregate=ORDER, aggregate_id=state["id"], action=action,
        state=state, origin=ORIGIN_CQRS, traceparent=traceparent,
    )
    connection.execute(
        insert(outbox).values(
            event_id=event.id,
            stream=CQRS_STREAM,
            fields=json.dumps(event.to_fields(), separators=(",", ":")),
            created_at=utc_now(),
        )
    )
