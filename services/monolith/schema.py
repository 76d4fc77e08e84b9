"""The monolith's tables and the triggers that write its change log.

Triggers on `users`, `products` and `orders` append one `change_log` row per written row in the same
transaction, so every write is captured, including writes from outside the API (a SQL shell, a
migration script). The logged image is the row's public JSON shape. An order's `items` column is
embedded as JSON, so an order's `row_json` is exactly the public order.

Versions: an UPDATE that does not raise `version` above both the row's old version and the last
version logged for its id gets the higher of the two plus one from the trigger, before the
change-log row is written. The logged version matters when an UPDATE gives a row an id that was used
before. An INSERT whose version is not above the last version logged for that id (an INSERT OR
REPLACE of an existing row, or a re-insert after a DELETE) is raised above it the same way. Neither
applies while a `sync_context` row exists, because the sync API writes exact versions.

Rows that SQL removes without a DELETE are captured too. A changed primary key logs the old id's
deletion. INSERT OR REPLACE and UPDATE OR REPLACE delete the row that conflicts on a UNIQUE column
without firing its delete trigger: a conflict on the primary key leaves the id with a newer version,
which receivers apply over the old row, and a conflict on another UNIQUE column (`UNIQUE_COLUMNS`)
is found by the replaced-row triggers, which log the vanished row's deletion from its last logged
image. The captured tables have no foreign keys, so no cascade can change them.

The version-raising statements rely on SQLite's default `recursive_triggers=OFF`, under which a
trigger's own UPDATE does not fire that trigger again. With recursive triggers on, a raw UPDATE
would log its after-image twice, which consumers skip as a duplicate, and an INSERT OR REPLACE
would also log the replaced row's deletion.

The relay prunes relayed change-log rows but keeps each id's row with the highest version, because
the triggers read the last logged version and image of an id from it.

NOTE: DROP TABLE removes a table's triggers and logs nothing; a migration that rebuilds a table
must run `create_schema` (the monolith does at every start) before writing to the new table.
"""

# ruff: noqa: S608 - the trigger DDL interpolates only the constant table and column names below.

import logging

from sqlalchemy import (
    CheckConstraint,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
)

from services.shared.clock import utc_now
from services.shared.database import applied_versions_table, create_sqlite_engine
from services.shared.domain import DEMO_PRODUCTS, DEMO_USERS
from services.shared.names import ORIGIN_CQRS, ORIGIN_MONOLITH

from .settings import Settings

log = logging.getLogger(__name__)

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String, primary_key=True),
    Column("username", String, nullable=False, unique=True),
    Column("display_name", String, nullable=False),
    Column("version", Integer, nullable=False, server_default="1"),
    Column("updated_at", String, nullable=False),
)

products = Table(
    "products",
    metadata,
    Column("id", String, primary_key=True),
    Column("name", String, nullable=False),
    Column("price", Integer, nullable=False),  # cents
    Column("version", Integer, nullable=False, server_default="1"),
    Column("updated_at", String, nullable=False),
    CheckConstraint("price >= 0", name="products_price_not_negative"),
)

orders = Table(
    "orders",
    metadata,
    Column("id", String, primary_key=True),
    Column("user_id", String, nullable=False),
    Column("items", Text, nullable=False),  # JSON list of {product_id, quantity, unit_price}
    Column("total_amount", Integer, nullable=False),  # cents
    Column("status", String, nullable=False),
    Column("version", Integer, nullable=False, server_default="1"),
    Column("created_at", String, nullable=False),
    Column("updated_at", String, nullable=False),
    CheckConstraint("json_valid(items)", name="orders_items_json"),
    Index("orders_by_user", "user_id", "created_at"),
)

change_log = Table(
    "change_log",
    metadata,
    Column("seq", Integer, primary_key=True),
    Column("table_name", String, nullable=False),
    Column("op", String, nullable=False),
    Column("row_id", String, nullable=False),
    Column("version", Integer, nullable=False),
    Column("origin", String, nullable=False),
    Column("row_json", Text, nullable=False),
    Column("changed_at", String, nullable=False),
    CheckConstraint("table_name IN ('users', 'products', 'orders')", name="change_log_table"),
    CheckConstraint("op IN ('insert', 'update', 'delete')", name="change_log_op"),
    # Serves the triggers' lookup of the last version logged for a row.
    Index("change_log_by_row", "table_name", "row_id", "version"),
    sqlite_autoincrement=True,  # never reuse a seq, even after the newest rows are deleted
)

# Holds one row while the sync API's transaction runs; the triggers read it to tag the origin.
sync_context = Table(
    "sync_context",
    metadata,
    Column("origin", String, nullable=False),
)

relay_checkpoint = Table(
    "relay_checkpoint",
    metadata,
    Column("name", String, primary_key=True),
    Column("seq", Integer, nullable=False),
)

conflicts = Table(
    "conflicts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("aggregate", String, nullable=False),
    Column("aggregate_id", String, nullable=False),
    Column("version", Integer, nullable=False),
    Column("local_json", Text, nullable=False),
    Column("incoming_json", Text, nullable=False),
    Column("incoming_origin", String, nullable=False),
    Column("resolution", String, nullable=False),
    Column("recorded_at", String, nullable=False),
    sqlite_autoincrement=True,
)

# Order states applied by the sync API, counted per version.
applied_versions = applied_versions_table(metadata)

# Columns of each captured table, in the order of its public JSON shape.
CAPTURED_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("id", "username", "display_name", "version", "updated_at"),
    "products": ("id", "name", "price", "version", "updated_at"),
    "orders": (
        "id", "user_id", "items", "total_amount", "status", "version", "created_at", "updated_at",
    ),
}
# Non-key columns with a UNIQUE constraint, whose REPLACE conflicts delete another row.
UNIQUE_COLUMNS: dict[str, tuple[str, ...]] = {"users": ("username",)}
# Columns stored as JSON text and embedded in the logged image as JSON values.
_JSON_COLUMNS = frozenset({"items"})

# SQLite's clock has millisecond resolution; padding keeps the six-digit format of `utc_now`.
_NOW_SQL = "(strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')"
_ORIGIN_SQL = f"COALESCE((SELECT origin FROM sync_context LIMIT 1), '{ORIGIN_MONOLITH}')"
_SYNCING_SQL = "EXISTS (SELECT 1 FROM sync_context)"


def _image_sql(table: str, ref: str) -> str:
    """Return a json_object(...) expression over the columns of `ref` (NEW, OLD or an alias)."""
    pairs = []
    for column in CAPTURED_COLUMNS[table]:
        value = f"json({ref}.{column})" if column in _JSON_COLUMNS else f"{ref}.{column}"
        pairs.append(f"'{column}', {value}")
    return f"json_object({', '.join(pairs)})"


def _last_logged_version_sql(table: str) -> str:
    return (
        "(SELECT COALESCE(MAX(version), 0) FROM change_log "
        f"WHERE table_name = '{table}' AND row_id = NEW.id)"
    )


_INSERT_CHANGE_SQL = (
    "INSERT INTO change_log (table_name, op, row_id, version, origin, row_json, changed_at) "
)


def _log_insert_sql(table: str, op: str, ref: str, *, source: str = "", where: str = "") -> str:
    return (
        f"{_INSERT_CHANGE_SQL}"
        f"SELECT '{table}', '{op}', {ref}.id, {ref}.version, {_ORIGIN_SQL}, "
        f"{_image_sql(table, ref)}, {_NOW_SQL}{source}{where};"
    )


def _insert_triggers(table: str) -> list[str]:
    last_logged = _last_logged_version_sql(table)
    log_insert = (
        f"CREATE TRIGGER {table}_cdc_insert AFTER INSERT ON {table} "
        f"WHEN {_SYNCING_SQL} OR NEW.version > {last_logged} "
        f"BEGIN {_log_insert_sql(table, 'insert', 'NEW')} END"
    )
    # An insert at or below the last logged version is raised by an UPDATE, and the update trigger
    # logs it. The WHEN clauses of the two insert triggers exclude each other.
    raise_version = (
        f"CREATE TRIGGER {table}_cdc_insert_version AFTER INSERT ON {table} "
        f"WHEN NOT {_SYNCING_SQL} AND NEW.version <= {last_logged} "
        f"BEGIN UPDATE {table} SET version = {last_logged} + 1 WHERE id = NEW.id; END"
    )
    return [log_insert, raise_version]


def _update_trigger(table: str) -> str:
    floor = f"MAX(OLD.version, {_last_logged_version_sql(table)})"
    raise_version = (
        f"UPDATE {table} SET version = {floor} + 1, "
        f"updated_at = CASE WHEN NEW.updated_at IS OLD.updated_at THEN {_NOW_SQL} "
        "ELSE NEW.updated_at END "
        f"WHERE id = NEW.id AND NEW.version <= {floor} AND NOT {_SYNCING_SQL};"
    )

    # A changed primary key retires the old id, so its before-image is logged as a deletion.
    log_renamed = _log_insert_sql(table, "delete", "OLD", where=" WHERE NEW.id IS NOT OLD.id")

    # The after-image is read back from the table, so it carries the version raised above.
    log_update = _log_insert_sql(
        table, "update", "after_row", source=f" FROM {table} AS after_row",
        where=" WHERE after_row.id = NEW.id",
    )
    return (
        f"CREATE TRIGGER {table}_cdc_update AFTER UPDATE ON {table} "
        f"BEGIN {raise_version} {log_renamed} {log_update} END"
    )


def _delete_trigger(table: str) -> str:
    return (
        f"CREATE TRIGGER {table}_cdc_delete AFTER DELETE ON {table} "
        f"BEGIN {_log_insert_sql(table, 'delete', 'OLD')} END"
    )


def _replaced_row_triggers(table: str) -> dict[str, str]:
    """Return, by name, triggers that log rows deleted by a REPLACE conflict on a UNIQUE column.

    Such a row is gone from the table without a logged deletion. Its last logged image is not a
    deletion, has the new row's value in the column, and belongs to an id no longer in the table.
    """
    triggers: dict[str, str] = {}
    for column in UNIQUE_COLUMNS.get(table, ()):
        latest_seq = (
            "(SELECT MAX(latest.seq) FROM change_log AS latest "
            f"WHERE latest.table_name = '{table}' AND latest.row_id = gone.row_id)"
        )
        log_deletion = (
            f"{_INSERT_CHANGE_SQL}"
            f"SELECT '{table}', 'delete', gone.row_id, gone.version, {_ORIGIN_SQL}, gone.row_json, "
            f"{_NOW_SQL} FROM change_log AS gone "
            f"WHERE gone.table_name = '{table}' AND gone.op != 'delete' "
            f"AND json_extract(gone.row_json, '$.{column}') = NEW.{column} "
            f"AND gone.row_id IS NOT NEW.id AND gone.seq = {latest_seq} "
            f"AND NOT EXISTS (SELECT 1 FROM {table} WHERE {table}.id = gone.row_id);"
        )
        triggers[f"{table}_cdc_replaced_{column}_insert"] = (
            f"CREATE TRIGGER {table}_cdc_replaced_{column}_insert AFTER INSERT ON {table} "
            f"BEGIN {log_deletion} END"
        )
        triggers[f"{table}_cdc_replaced_{column}_update"] = (
            f"CREATE TRIGGER {table}_cdc_replaced_{column}_update "
            f"AFTER UPDATE OF {column} ON {table} BEGIN {log_deletion} END"
        )
    return triggers


def trigger_names(table: str) -> list[str]:
    """Return the names of the change-capture triggers of `table`."""
    names = [f"{table}_{name}" for name in ("cdc_insert", "cdc_insert_version", "cdc_update",
                                             "cdc_delete")]
    return [*names, *_replaced_row_triggers(table)]


def trigger_statements(table: str) -> list[str]:
    """Return the DDL that drops and recreates the change-capture triggers of `table`."""
    drops = [f"DROP TRIGGER IF EXISTS {name}" for name in trigger_names(table)]
    return [
        *drops,
        *_insert_triggers(table),
        _update_trigger(table),
        _delete_trigger(table),
        *_replaced_row_triggers(table).values(),
    ]


def create_schema(connection: Connection) -> None:
    """Create missing tables and (re)create the triggers; safe to run on every start."""
    metadata.create_all(connection)
    for table in CAPTURED_COLUMNS:
        for statement in trigger_statements(table):
            connection.exec_driver_sql(statement)
    # The sync API deletes its row before commit, so a leftover row can only come from a manual
    # insert. It would tag every later write as CQRS-made and keep it from being published.
    leftover = connection.execute(sync_context.delete()).rowcount
    if leftover:
        log.warning(
            "removed leftover sync_context rows; writes made meanwhile were tagged origin cqrs",
            extra={"rows": leftover, "origin": ORIGIN_CQRS},
        )


def seed_demo_data(connection: Connection) -> int:
    """Insert the demo users and products that are missing; return how many rows were added.

    The rows go through the triggers, so the CDC relay publishes them like any other write.
    """
    now = utc_now()
    added = 0
    known_users = set(connection.scalars(select(users.c.id)))
    for user in DEMO_USERS:
        if user["id"] not in known_users:
            connection.execute(
                insert(users).values(
                    id=user["id"], username=user["username"], display_name=user["display_name"],
                    version=1, updated_at=now,
                )
            )
            added += 1
    known_products = set(connection.scalars(select(products.c.id)))
    for product in DEMO_PRODUCTS:
        if product["id"] not in known_products:
            connection.execute(
                insert(products).values(
                    id=product["id"], name=product["name"], price=product["price"], version=1,
                    updated_at=now,
                )
            )
            added += 1
    return added


def open_database(settings: Settings, *, seed: bool = False) -> Engine:
    """Open the monolith's SQLite file, create its schema, and seed demo data when `seed` is set."""
    path = settings.resolved_database_path
    engine = create_sqlite_engine(path)
    with engine.begin() as connection:
        create_schema(connection)
        added = seed_demo_data(connection) if seed else 0
    log.info("monolith database ready", extra={"path": str(path), "seeded_rows": added})
    return engine
