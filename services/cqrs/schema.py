"""Tables of the CQRS write model (`cqrs.db`).

`orders`, `products` and `users` have the monolith's columns plus `origin`, the side that wrote the
stored state. `outbox` contains each command's event, written in the command's transaction, until
the outbox relay appends it to its stream. `relay_checkpoint` stores the last relayed outbox `seq`.
`conflicts` records every state that had the stored version but other content, with both states.
`applied_versions` counts how often CDC ingest applied each version of each entity. The outbox relay
deletes outbox rows once their checkpoint is stored.
"""

import logging

from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, Text

from services.shared.database import applied_versions_table, create_sqlite_engine

from .settings import Settings

log = logging.getLogger(__name__)

metadata = MetaData()

orders = Table(
    "orders", metadata,
    Column("id", String, primary_key=True),
    Column("user_id", String, nullable=False, index=True),
    Column("items", Text, nullable=False),  # JSON list of {product_id, quantity, unit_price}
    Column("total_amount", Integer, nullable=False),
    Column("status", String, nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", String, nullable=False),
    Column("updated_at", String, nullable=False),
    Column("origin", String, nullable=False),
)

products = Table(
    "products", metadata,
    Column("id", String, primary_key=True),
    Column("name", String, nullable=False),
    Column("price", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_at", String, nullable=False),
    Column("origin", String, nullable=False),
)

users = Table(
    "users", metadata,
    Column("id", String, primary_key=True),
    Column("username", String, nullable=False),
    Column("display_name", String),
    Column("version", Integer, nullable=False),
    Column("updated_at", String, nullable=False),
    Column("origin", String, nullable=False),
)

outbox = Table(
    "outbox", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String, nullable=False, unique=True),
    Column("stream", String, nullable=False),
    Column("fields", Text, nullable=False),  # JSON object of the entry's Redis fields
    Column("created_at", String, nullable=False),
    sqlite_autoincrement=True,
)

relay_checkpoint = Table(
    "relay_checkpoint", metadata,
    Column("name", String, primary_key=True),
    Column("seq", Integer, nullable=False),
)

conflicts = Table(
    "conflicts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("aggregate", String, nullable=False),
    Column("aggregate_id", String, nullable=False),
    Column("version", Integer, nullable=False),
    Column("local_json", Text, nullable=False),
    Column("incoming_json", Text, nullable=False),
    Column("incoming_origin", String, nullable=False),
    Column("resolution", String, nullable=False),  # conflict_apply or conflict_keep
    Column("recorded_at", String, nullable=False),
    sqlite_autoincrement=True,
)

applied_versions = applied_versions_table(metadata)

AGGREGATE_TABLES: dict[str, Table] = {"order": orders, "product": products, "user": users}


def open_write_model(settings: Settings) -> Engine:
    """Create the engine on the write model's SQLite file and create missing tables."""
    engine = create_sqlite_engine(settings.database_file)
    metadata.create_all(engine)
    log.info("write model opened", extra={"database_path": str(settings.database_file)})
    return engine
