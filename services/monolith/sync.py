"""The internal sync API, through which the CQRS side's reverse-sync worker writes orders back.

Only service tokens (client credentials) of the configured clients with scope `sync:write` may
call it. A `sync_context` row exists for the whole transaction of each call, so the change-log
triggers tag the write with origin `cqrs` and keep its exact version, and the CDC relay does not
publish it back.
"""

import json
import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from sqlalchemy import Engine, insert

from services.shared.clock import utc_now
from services.shared.consistency import Decision, content_hash, decide
from services.shared.database import count_apply
from services.shared.domain import OrderPublic
from services.shared.errors import Forbidden, ValidationFailed
from services.shared.migration_health import SYNC_CONFLICTS
from services.shared.names import ORIGIN_CQRS
from services.shared.scopes import SYNC_WRITE
from services.shared.security import Principal
from services.shared.web import require_scope

from . import store
from .routes import DatabaseEngine
from .schema import applied_versions, conflicts, sync_context
from .settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/internal/sync")

# Built once, like the store's statements, because they run while the write lock is held.
_ENTER_SYNC_CONTEXT = insert(sync_context).values(origin=ORIGIN_CQRS)
_LEAVE_SYNC_CONTEXT = sync_context.delete()

SyncWriter = Annotated[Principal, Depends(require_scope(SYNC_WRITE))]


class SyncRequest(BaseModel):
    state: OrderPublic
    event_id: str = Field(min_length=1, max_length=200)


class SyncResponse(BaseModel):
    decision: Decision
    version: int  # the monolith's version of the order after the call


@dataclass(frozen=True)
class SyncResult:
    decision: Decision
    version: int  # the monolith's version of the order after the call


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def require_sync_client(principal: SyncWriter, request: Request) -> Principal:
    """Admit only a service token of a client listed in `sync_client_ids` (403 otherwise)."""
    allowed = settings_of(request).sync_client_ids
    if not principal.is_service:
        raise Forbidden(
            "The internal sync API accepts only service tokens from the client credentials grant; "
            "user tokens are rejected whatever scopes they carry."
        )
    if principal.client_id not in allowed:
        raise Forbidden(
            f"Client {principal.client_id!r} may not call the internal sync API; "
            f"allowed clients: {', '.join(allowed) or 'none'} (MONOLITH_SYNC_CLIENT_IDS)."
        )
    return principal


SyncClient = Annotated[Principal, Depends(require_sync_client)]


def apply_order_state(engine: Engine, state: OrderPublic, *, authority: str) -> SyncResult:
    """Apply an order state from the CQRS side when `decide` allows it, and record any conflict.

    Everything happens in one transaction: the `sync_context` row is inserted first and deleted
    before commit, so no other transaction ever sees it.
    """
    incoming = state.model_dump(mode="json")
    with engine.begin() as connection:
        connection.execute(_ENTER_SYNC_CONTEXT)
        local = store.get_order(connection, state.id)
        local_state = None if local is None else local.model_dump(mode="json")
        decision = decide(
            local_version=None if local is None else local.version,
            local_hash=None if local_state is None else content_hash(local_state),
            incoming_version=state.version,
            incoming_hash=content_hash(incoming),
            incoming_origin=ORIGIN_CQRS,
            authority=authority,
        )
        if decision.applies:
            store.upsert_order(connection, state)
            count_apply(
                connection, applied_versions, aggregate="order", aggregate_id=state.id,
                version=state.version,
            )
        if decision.conflict:
            connection.execute(
                insert(conflicts).values(
                    aggregate="order",
                    aggregate_id=state.id,
                    version=state.version,
                    local_json=json.dumps(local_state, sort_keys=True),
                    incoming_json=json.dumps(incoming, sort_keys=True),
                    incoming_origin=ORIGIN_CQRS,
                    resolution=decision.value,
                    recorded_at=utc_now(),
                )
            )
        connection.execute(_LEAVE_SYNC_CONTEXT)
    if decision.conflict:
        SYNC_CONFLICTS.labels("monolith", decision.value).inc()
    if decision.applies or local is None:
        return SyncResult(decision=decision, version=state.version)
    return SyncResult(decision=decision, version=local.version)


@router.put("/orders/{order_id}")
def sync_order(
    order_id: str, body: SyncRequest, principal: SyncClient, engine: DatabaseEngine,
    request: Request,
) -> SyncResponse:
    if body.state.id != order_id:
        raise ValidationFailed(
            f"state.id {body.state.id!r} differs from the order id {order_id!r} in the path; "
            "send the state to the URL of its own order.",
            field="state.id",
        )
    authority = settings_of(request).phase.authority
    result = apply_order_state(engine, body.state, authority=authority)
    ids = {"order_id": order_id, "event_id": body.event_id, "client_id": principal.client_id,
           "incoming_version": body.state.version, "decision": result.decision.value,
           "version": result.version}
    if result.decision.conflict:
        log.warning("order sync conflict recorded", extra={**ids, "authority": authority})
    else:
        log.info("order sync handled", extra=ids)
    return SyncResponse(decision=result.decision, version=result.version)
