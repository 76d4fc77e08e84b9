"""SQLite engines tuned for several writing processes at once.

WAL lets readers run beside the one writer. Write transactions start with `BEGIN IMMEDIATE`, so a
transaction takes the write lock at its start and waits up to the busy timeout for it, instead of
failing with `database is locked` when it first writes. Read-only work opts into `BEGIN DEFERRED`
with `engine.connect().execution_options(sqlite_begin="DEFERRED")`.

While it waits for the write lock, a transaction polls for it every millisecond or two itself.
SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 and then 100 ms between
attempts (`sqliteDefaultBusyCallback` in SQLite's main.c). A writer queued behind transactions
of a millisecond each could then sleep for tens of milliseconds after the lock was free, which
set the tail latency of the monolith's sync writes while its CDC relay stored checkpoints.
"""

import functools
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
)
from sqlalchemy.dialects.sqlite import Insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

BUSY_TIMEOUT_MS = 30_000
# Pause between attempts to take the write lock: the first, and the longest.
LOCK_POLL_FIRST_SECONDS = 0.0005
LOCK_POLL_MAX_SECONDS = 0.002


def create_sqlite_engine(path: Path) -> Engine:
    """Create an engine on the SQLite file at `path`, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        f"sqlite+pysqlite:///{path}",
        connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        pool_pre_ping=False,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own transaction handling would issue a deferred BEGIN; take control of it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        if mode == "IMMEDIATE":
            begin_immediate(connection.connection.dbapi_connection)
        else:
            connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def begin_immediate(dbapi_connection: sqlite3.Connection) -> None:
    """Run `BEGIN IMMEDIATE`, polling for the write lock for up to the busy timeout.

    Raises sqlite3.OperationalError (`database is locked`) when the lock stays taken that long.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = LOCK_POLL_FIRST_SECONDS
    dbapi_connection.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as error:
                busy = getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, LOCK_POLL_MAX_SECONDS)
    finally:
        # Other statements, such as a read that meets WAL recovery, keep SQLite's busy handler.
        dbapi_connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


def applied_versions_table(metadata: MetaData) -> Table:
    """Define the apply counters: how often each version of each entity was applied.

    A receiver increments the counter of a version in the transaction that applies it, so the
    count is exact even when the process dies right after. A count above 1 means that an event
    was applied twice.
    """
    return Table(
        "applied_versions",
        metadata,
        Column("aggregate", String, primary_key=True),
        Column("aggregate_id", String, primary_key=True),
        Column("version", Integer, primary_key=True),
        Column("applies", Integer, nullable=False),
    )


def count_apply(
    connection: Connection, table: Table, *, aggregate: str, aggregate_id: str, version: int
) -> None:
    """Add one to the apply counter of `version` of an entity, in the caller's transaction."""
    connection.execute(
        _count_apply_statement(table),
        {"aggregate": aggregate, "aggregate_id": aggregate_id, "version": version, "applies": 1},
    )


@functools.cache
def _count_apply_statement(table: Table) -> Insert:
    # Built once per table, because building it costs more than running it.
    statement = sqlite_insert(table)
    return statement.on_conflict_do_update(
        index_elements=[table.c.aggregate, table.c.aggregate_id, table.c.version],
        set_={"applies": table.c.applies + 1},
    )
