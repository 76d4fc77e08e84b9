"""Reads of the write model, and the version-gated apply that CDC ingest uses.

Every function here is blocking; async callers run it in a worker thread.
"""

import functools
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, Row, Select, Table, bindparam, delete, insert, select
from sqlalchemy.dialects.sqlite import Insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from services.shared.clock import utc_now
from services.shared.consistency import Decision, content_hash, decide
from services.shared.database import count_apply
from services.shared.events import Event
from services.shared.migration_health import SYNC_CONFLICTS

from .schema import AGGREGATE_TABLES, applied_versions, conflicts, orders, products
from .states import ORDER, PRODUCT, event_state

log = logging.getLogger(__name__)

STATE_COLUMNS: dict[str, tuple[str, ...]] = {
    aggregate: tuple(column.name for column in table.columns if column.name != "origin")
    for aggregate, table in AGGREGATE_TABLES.items()
}


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """Open a connection for reads only; it takes no write lock."""
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as connection:
        yield connection


def row_to_state(aggregate: str, row: Row[Any]) -> dict[str, Any]:
    """Return the public state of a table row, without `origin`."""
    values = row._mapping
    state = {name: values[name] for name in STATE_COLUMNS[aggregate]}
    if aggregate == ORDER:
        state["items"] = json.loads(state["items"])
    return state


def state_to_row(aggregate: str, state: dict[str, Any], *, origin: str) -> dict[str, Any]:
    row = {name: state[name] for name in STATE_COLUMNS[aggregate]}
    if aggregate == ORDER:
        row["items"] = json.dumps(state["items"], separators=(",", ":"))
    row["origin"] = origin
    return row


# The statements below are built once per aggregate and run with bound parameters, because
# building a statement anew for each event costs several times more than running it.


@functools.cache
def _select_statement(aggregate: str) -> Select[Any]:
    table = AGGREGATE_TABLES[aggregate]
    return select(table).where(table.c.id == bindparam("aggregate_id"))


@functools.cache
def _select_many_statement(aggregate: str) -> Select[Any]:
    table = AGGREGATE_TABLES[aggregate]
    return select(table).where(table.c.id.in_(bindparam("aggregate_ids", expanding=True)))


@functools.cache
def _upsert_statement(aggregate: str) -> Insert:
    table = AGGREGATE_TABLES[aggregate]
    statement = sqlite_insert(table)
    return statement.on_conflict_do_update(
        index_elements=[table.c.id],
        set_={
            column.name: statement.excluded[column.name]
            for column in table.columns
            if column.name != "id"
        },
    )


def load_state(connection: Connection, aggregate: str, aggregate_id: str) -> dict[str, Any] | None:
    row = connection.execute(
        _select_statement(aggregate), {"aggregate_id": aggregate_id}
    ).first()
    return None if row is None else row_to_state(aggregate, row)


def upsert_state(
    connection: Connection, aggregate: str, state: dict[str, Any], *, origin: str
) -> None:
    connection.execute(_upsert_statement(aggregate), state_to_row(aggregate, state, origin=origin))


def apply_event(engine: Engine, event: Event, *, authority: str) -> Decision:
    """Apply the state an event carries to the write model by version, in one transaction.

    Each apply of a state adds one to the version's counter in `applied_versions`, in the same
    transaction. A deletion is not counted, because a repeated deletion finds no row to delete.

    A newer version replaces the stored state. A state with the stored version but other content is
    recorded in `conflicts` and replaces the stored state only when `event.origin` is `authority`.
    A deletion removes the row when its version is at least the stored one. For a deletion the
    result is APPLY when a row was removed, STALE when the stored version is newer, and DUPLICATE
    when no row is stored.

    Raises InvalidState when the event's data is not a valid state of its aggregate.
    """
    return apply_events(engine, [event], authority=authority)[0]


def apply_events(engine: Engine, events: Sequence[Event], *, authority: str) -> list[Decision]:
    """Apply events in order in one transaction, each by version as `apply_event` does.

    Returns one decision per event. Each event reads the writes of the events before it. Raises
    InvalidState, or the database error, for the first event that fails, and then nothing of the
    batch is applied.
    """
    with engine.begin() as connection:
        preloaded = _load_states(connection, events)
        decisions = [_apply_in(connection, event, authority, preloaded) for event in events]
    for decision in decisions:
        if decision.conflict:
            SYNC_CONFLICTS.labels("cqrs-write", decision.value).inc()
    return decisions


# Ids per SELECT when a batch's stored states are read together, well below SQLite's limit of
# 32,766 bound parameters (SQLite 3.32 and later).
_LOAD_CHUNK = 500
_Preloaded = dict[tuple[str, str], dict[str, Any] | None]


def _load_states(connection: Connection, events: Sequence[Event]) -> _Preloaded:
    """Return the stored state (None when there is none) of each entity the events are about.

    One SELECT per aggregate and chunk replaces one per event. Events of an unknown aggregate
    are left out, so `_apply_in` reports them as before.
    """
    ids_by_aggregate: dict[str, dict[str, None]] = {}  # a dict keeps first-seen order, unique
    for event in events:
        if event.aggregate in AGGREGATE_TABLES:
            ids_by_aggregate.setdefault(event.aggregate, {})[event.aggregate_id] = None
    preloaded: _Preloaded = {}
    for aggregate, ids in ids_by_aggregate.items():
        unique = list(ids)
        for start in range(0, len(unique), _LOAD_CHUNK):
            chunk = unique[start:start + _LOAD_CHUNK]
            rows = connection.execute(_select_many_statement(aggregate), {"aggregate_ids": chunk})
            for row in rows:
                preloaded[(aggregate, row.id)] = row_to_state(aggregate, row)
        for aggregate_id in unique:
            preloaded.setdefault((aggregate, aggregate_id), None)
    return preloaded


def _apply_in(
    connection: Connection, event: Event, authority: str, preloaded: _Preloaded
) -> Decision:
    state = event_state(event)
    aggregate = event.aggregate
    # A preloaded state serves only the first event of its entity, because that event's write may
    # change it. A later event of the same entity in the batch reads the table again.
    key = (aggregate, event.aggregate_id)
    if key in preloaded:
        local = preloaded.pop(key)
    else:
        local = load_state(connection, aggregate, event.aggregate_id)
    if event.deleted:
        return _apply_deletion(connection, AGGREGATE_TABLES[aggregate], state, local)
    decision = decide(
        local_version=None if local is None else int(local["version"]),
        local_hash=None if local is None else content_hash(local),
        incoming_version=state["version"],
        incoming_hash=content_hash(state),
        incoming_origin=event.origin,
        authority=authority,
    )
    if decision.conflict:
        assert local is not None  # decide reports a conflict only against a stored state
        record_conflict(
            connection, aggregate, local=local, incoming=state, incoming_origin=event.origin,
            resolution=decision,
        )
        log.warning(
            "conflicting state received",
            extra={"aggregate": aggregate, "aggregate_id": event.aggregate_id,
                   "version": state["version"], "event_id": event.id,
                   "origin": event.origin, "resolution": decision.value},
        )
    if decision.applies:
        upsert_state(connection, aggregate, state, origin=event.origin)
        _count_apply(connection, aggregate, state)
    return decision


def _count_apply(connection: Connection, aggregate: str, state: dict[str, Any]) -> None:
    count_apply(
        connection, applied_versions, aggregate=aggregate, aggregate_id=state["id"],
        version=state["version"],
    )


def _apply_deletion(
    connection: Connection, table: Table, state: dict[str, Any], local: dict[str, Any] | None
) -> Decision:
    # NOTE: no tombstone is kept, so an older event of the aggregate that arrives after the deletion
    # inserts the row again.
    if local is None:
        return Decision.DUPLICATE
    if state["version"] < int(local["version"]):
        return Decision.STALE
    connection.execute(delete(table).where(table.c.id == state["id"]))
    return Decision.APPLY


def record_conflict(
    connection: Connection,
    aggregate: str,
    *,
    local: dict[str, Any],
    incoming: dict[str, Any],
    incoming_origin: str,
    resolution: Decision,
) -> None:
    connection.execute(
        insert(conflicts).values(
            aggregate=aggregate,
            aggregate_id=incoming["id"],
            version=incoming["version"],
            local_json=json.dumps(local, sort_keys=True),
            incoming_json=json.dumps(incoming, sort_keys=True),
            incoming_origin=incoming_origin,
            resolution=resolution.value,
            recorded_at=utc_now(),
        )
    )


def load_order(engine: Engine, order_id: str) -> dict[str, Any] | None:
    with reading(engine) as connection:
        return load_state(connection, ORDER, order_id)


def list_orders(engine: Engine, user_id: str) -> list[dict[str, Any]]:
    """Return a user's orders, newest first."""
    query = (
        select(orders)
        .where(orders.c.user_id == user_id)
        .order_by(orders.c.created_at.desc(), orders.c.id.desc())
    )
    with reading(engine) as connection:
        return [row_to_state(ORDER, row) for row in connection.execute(query)]


def load_product(engine: Engine, product_id: str) -> dict[str, Any] | None:
    with reading(engine) as connection:
        return load_state(connection, PRODUCT, product_id)


def list_products(engine: Engine) -> list[dict[str, Any]]:
    """Return every product, ordered by id."""
    with reading(engine) as connection:
        rows = connection.execute(select(products).order_by(products.c.id))
        return [row_to_state(PRODUCT, row) for row in rows]
