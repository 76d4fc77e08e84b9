"""Internal read API of the reconciler: the monolith's digests, unrelayed changes and conflicts.

Routes live under `/internal/reconcile`, which the router never forwards. They admit the same
service tokens as the internal sync API (`require_sync_client`), because the reconciler runs with
the reverse-sync client's credentials, which may already write any order state here.
"""

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import Connection, Table, select

from services.shared import relay
from services.shared.domain import OrderPublic, ProductPublic
from services.shared.errors import NotFound
from services.shared.names import ORIGIN_MONOLITH
from services.shared.reconciliation import (
    KINDS,
    MAX_DIGEST_PAGE,
    ORDER,
    PRODUCT,
    Digest,
    digest_page,
    digest_query,
    list_conflicts,
)
from services.shared.security import Principal

from .routes import DatabaseEngine
from .schema import change_log, conflicts, orders, products, relay_checkpoint
from .store import read_connection
from .sync import require_sync_client
from .workers.cdc_relay import CHECKPOINT_NAME

router = APIRouter(prefix="/internal/reconcile")

Reconciler = Annotated[Principal, Depends(require_sync_client)]

MAX_PAGE = MAX_DIGEST_PAGE
TABLES: dict[str, Table] = {ORDER: orders, PRODUCT: products}
KINDS_OF_TABLES = {"orders": ORDER, "products": PRODUCT}


def _state(kind: str, row: Any) -> dict[str, Any]:
    if kind == ORDER:
        values = {**row, "items": json.loads(row["items"])}
        return OrderPublic.model_validate(values).model_dump(mode="json")
    return ProductPublic.model_validate(dict(row)).model_dump(mode="json")


def _table_of(kind: str) -> Table:
    table = TABLES.get(kind)
    if table is None:
        raise NotFound(f"Kind {kind!r} has no digests; use one of {', '.join(KINDS)}.")
    return table


def list_digests(
    connection: Connection, kind: str, *, after: str, limit: int, ids: list[str]
) -> list[Digest]:
    """Return the digests of `ids`, or else of up to `limit` entities with an id above `after`."""
    query = digest_query(_table_of(kind), after=after, limit=limit, ids=ids)
    return [Digest.of(kind, _state(kind, row)) for row in connection.execute(query).mappings()]


@router.get("/digests/{kind}")
def get_digests(
    kind: str,
    _principal: Reconciler,
    engine: DatabaseEngine,
    after: str = "",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
    ids: Annotated[list[str] | None, Query(alias="id", max_length=MAX_PAGE)] = None,
) -> dict[str, Any]:
    """Return one page of digests in id order; `next_after` is null on the last page."""
    with read_connection(engine) as connection:
        digests = list_digests(connection, kind, after=after, limit=limit, ids=ids or [])
    return digest_page(kind, digests, limit=limit, ids=ids)


@router.get("/unrelayed")
def get_unrelayed(_principal: Reconciler, engine: DatabaseEngine) -> dict[str, Any]:
    """Return the change-log rows the CDC relay has not appended to `cdc.monolith` yet."""
    with read_connection(engine) as connection:
        checkpoint = relay.read_checkpoint(connection, relay_checkpoint, CHECKPOINT_NAME)
        query = (
            select(change_log.c.seq, change_log.c.table_name, change_log.c.row_id)
            .where(change_log.c.seq > checkpoint, change_log.c.origin == ORIGIN_MONOLITH)
            .where(change_log.c.table_name.in_(list(KINDS_OF_TABLES)))
            .order_by(change_log.c.seq)
        )
        rows = connection.execute(query).all()
    return {
        "checkpoint": checkpoint,
        "entities": [
            {"kind": KINDS_OF_TABLES[row.table_name], "id": row.row_id, "seq": row.seq}
            for row in rows
        ],
    }


@router.get("/conflicts")
def get_conflicts(
    _principal: Reconciler,
    engine: DatabaseEngine,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> dict[str, Any]:
    """Return the newest recorded conflicts of the monolith."""
    with read_connection(engine) as connection:
        return {"side": ORIGIN_MONOLITH, "conflicts": list_conflicts(connection, conflicts, limit)}
