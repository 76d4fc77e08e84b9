"""Internal read API of the reconciler: the write model's digests, unrelayed outbox rows and
conflicts.

Routes live under `/internal/reconcile`, which the router never forwards. They admit only service
tokens of the client the CQRS side itself uses (`CQRS_SYNC_CLIENT_ID`) with scope `sync:write`:
the reconciler runs with those credentials, which may already write any order state into the
monolith, so reading digests needs no broader grant.
"""

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import Engine, select

from services.shared.errors import Forbidden, NotFound
from services.shared.events import Event
from services.shared.names import ORIGIN_CQRS
from services.shared.reconciliation import (
    KINDS,
    MAX_DIGEST_PAGE,
    Digest,
    digest_page,
    digest_query,
    list_conflicts,
)
from services.shared.scopes import SYNC_WRITE
from services.shared.security import Principal
from services.shared.web import require_scope

from .schema import AGGREGATE_TABLES, conflicts, outbox
from .settings import Settings
from .states import canonical_state
from .workers.outbox_relay import read_checkpoint
from .write_model import reading, row_to_state

router = APIRouter(prefix="/internal/reconcile")

MAX_PAGE = MAX_DIGEST_PAGE

SyncScoped = Annotated[Principal, Depends(require_scope(SYNC_WRITE))]


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.resources.engine
    return engine


def require_reconciler(principal: SyncScoped, request: Request) -> Principal:
    """Admit only a service token of the CQRS side's own sync client (403 otherwise)."""
    allowed = _settings(request).sync_client_id
    if not principal.is_service:
        raise Forbidden(
            "The internal reconcile API accepts only service tokens from the client credentials "
            "grant; user tokens are rejected whatever scopes they carry."
        )
    if principal.client_id != allowed:
        raise Forbidden(
            f"Client {principal.client_id!r} may not call the internal reconcile API; the allowed "
            f"client is {allowed!r} (CQRS_SYNC_CLIENT_ID)."
        )
    return principal


Reconciler = Annotated[Principal, Depends(require_reconciler)]
WriteModel = Annotated[Engine, Depends(_engine)]


@router.get("/digests/{kind}")
def get_digests(
    kind: str,
    _principal: Reconciler,
    engine: WriteModel,
    after: str = "",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
    ids: Annotated[list[str] | None, Query(alias="id", max_length=MAX_PAGE)] = None,
) -> dict[str, Any]:
    """Return one page of write-model digests in id order; `next_after` is null on the last page."""
    if kind not in KINDS:
        raise NotFound(f"Kind {kind!r} has no digests; use one of {', '.join(KINDS)}.")
    query = digest_query(AGGREGATE_TABLES[kind], after=after, limit=limit, ids=ids)
    with reading(engine) as connection:
        rows = connection.execute(query).all()
    digests = [Digest.of(kind, canonical_state(kind, row_to_state(kind, row))) for row in rows]
    return digest_page(kind, digests, limit=limit, ids=ids)


@router.get("/unrelayed")
def get_unrelayed(_principal: Reconciler, engine: WriteModel) -> dict[str, Any]:
    """Return the outbox rows the outbox relay has not appended to their stream yet."""
    checkpoint = read_checkpoint(engine)
    query = select(outbox.c.seq, outbox.c.fields).where(outbox.c.seq > checkpoint)
    with reading(engine) as connection:
        rows = connection.execute(query.order_by(outbox.c.seq)).all()
    entities = []
    for row in rows:
        event = Event.from_fields(json.loads(row.fields))
        entities.append({"kind": event.aggregate, "id": event.aggregate_id, "seq": row.seq})
    return {"checkpoint": checkpoint, "entities": entities}


@router.get("/conflicts")
def get_conflicts(
    _principal: Reconciler,
    engine: WriteModel,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> dict[str, Any]:
    """Return the newest recorded conflicts of the write model."""
    with reading(engine) as connection:
        return {"side": ORIGIN_CQRS, "conflicts": list_conflicts(connection, conflicts, limit)}
