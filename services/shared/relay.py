"""Checkpointed relays from a SQLite table to Redis Streams, at least once.

Both the monolith's CDC relay (change log to `cdc.monolith`) and the CQRS outbox relay (outbox to
`events.cqrs`) read rows after a stored checkpoint, append them in one MULTI/EXEC, and only then
store the last row's `seq`. A crash between the append and the checkpoint appends the rows again,
so entries may repeat (receivers skip them by version) but never go missing.

Rows are pruned in the transaction that stores the checkpoint, so only rows that Redis has
acknowledged on the stream are ever removed. Between rounds each relay trims its stream of the
entries that every consumer group has acknowledged, which keeps the stream's length bounded.

An idle relay looks every poll interval at a `CommitWatch`, which costs microseconds, and reads the
table only after another connection committed to the database. A pause of a few milliseconds
therefore costs little CPU while nothing changes (about 3% of a core per relay at 2 ms, measured
with the local runner on a 2-vCPU machine).
"""

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors
from sqlalchemy import Connection, Engine, Select, Table, bindparam, func, select
from sqlalchemy.dialects.sqlite import Insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from .retry import backoff_seconds, sleep_unless_stopped

log = logging.getLogger(__name__)

# Errors after which a relay round is retried; the checkpoint has not moved when they occur.
RETRYABLE_ERRORS = (redis_errors.RedisError, OSError, SQLAlchemyError)
# An idle relay runs a round at least this often even when no commit was seen, so that the rounds'
# lag reports keep coming at their rate of once a second.
IDLE_ROUND_SECONDS = 1.0
# Pauses up to this long are not interrupted by a stop request.
SHORT_PAUSE_SECONDS = 0.05
# How long a look at the commit counter waits for a lock; on timeout the relay reads the table.
COMMIT_WATCH_TIMEOUT_SECONDS = 0.05


class CommitWatch:
    """Reports whether another connection committed to a SQLite database since the last look.

    SQLite changes `PRAGMA data_version` on a connection only when another connection commits
    (SQLite 3.8.8 and later), and reading it from a kept connection takes a few microseconds, so
    a look runs on the event loop. Commits of the relay's own checkpoint count too, which costs
    one more round after each batch.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None
        self._version: int | None = None

    def changed(self) -> bool:
        """Return True when a commit happened since the previous call, or on the first call.

        A database error returns True, so that the relay's round runs and reports it.
        """
        try:
            if self._connection is None:
                self._connection = sqlite3.connect(
                    self.path, timeout=COMMIT_WATCH_TIMEOUT_SECONDS, isolation_level=None
                )
            version = int(self._connection.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as error:
            log.debug("commit watch failed; reading the table instead",
                      extra={"database_path": str(self.path), "error": repr(error)})
            self.close()
            return True
        changed = version != self._version
        self._version = version
        return changed

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        self._version = None


def read_checkpoint(connection: Connection, table: Table, name: str) -> int:
    """Return the last relayed `seq` stored under `name`, 0 before the first round."""
    seq = connection.scalar(_read_checkpoint_statement(table), {"name": name})
    return int(seq) if seq is not None else 0


@functools.cache
def _read_checkpoint_statement(table: Table) -> Select[Any]:
    return select(table.c.seq).where(table.c.name == bindparam("name"))


# Deletes relayed rows in the checkpoint's transaction; takes the connection, the previous
# checkpoint and the new one, and returns the number of rows deleted.
Prune = Callable[[Connection, int, int], int]


def store_checkpoint(
    engine: Engine,
    table: Table,
    name: str,
    seq: int,
    *,
    prune: Prune | None = None,
    after_seq: int = 0,
) -> int:
    """Store `seq` under `name`, then call `prune` for the rows in (`after_seq`, `seq`].

    MAX keeps the checkpoint from moving back if two relays ever run at once. Both happen in one
    transaction, so a row is never deleted before the checkpoint that covers it is stored.
    Returns the number of rows pruned.
    """
    with engine.begin() as connection:
        connection.execute(_checkpoint_statement(table), {"name": name, "seq": seq})
        return prune(connection, after_seq, seq) if prune is not None else 0


@functools.cache
def _checkpoint_statement(table: Table) -> Insert:
    # Built once per table, because building the upsert costs more than running it.
    statement = sqlite_insert(table)
    return statement.on_conflict_do_update(
        index_elements=[table.c.name],
        set_={"seq": func.max(table.c.seq, statement.excluded.seq)},
    )


async def run_relay(
    relay_once: Callable[[], Awaitable[int]],
    *,
    stop: asyncio.Event,
    batch_size: int,
    poll_interval_seconds: float,
    ids: dict[str, Any],
    retry_base_seconds: float = 0.2,
    retry_max_seconds: float = 10.0,
    trim: Callable[[], Awaitable[int]] | None = None,
    trim_interval_seconds: float = 5.0,
    commit_watch: CommitWatch | None = None,
) -> None:
    """Call `relay_once` until `stop` is set, sleeping when a round moved less than a full batch.

    `relay_once` relays one batch and returns how many rows it moved past. With `commit_watch`,
    an idle relay skips a round while no commit was seen, but not for longer than
    `IDLE_ROUND_SECONDS`. `trim`, when given, runs after a round at most once per
    `trim_interval_seconds`. A failed round or trim is logged and retried with backoff. A stop
    request lets the round in progress finish, so the rows it appended get their checkpoint.
    """
    failures = 0
    next_trim = time.monotonic()
    last_round = 0.0
    idle = False
    while not stop.is_set():
        # The counter is read before the round, so a commit during the round is seen next time.
        if idle and commit_watch is not None and not commit_watch.changed() and (
            time.monotonic() - last_round < IDLE_ROUND_SECONDS
        ):
            await _pause(stop, poll_interval_seconds)
            continue
        last_round = time.monotonic()
        try:
            relayed = await relay_once()
            if trim is not None and time.monotonic() >= next_trim:
                next_trim = time.monotonic() + trim_interval_seconds
                await _trim_logging_errors(trim, ids)
        except RETRYABLE_ERRORS as error:
            failures += 1
            delay = backoff_seconds(failures, base=retry_base_seconds, maximum=retry_max_seconds)
            dependency = "database" if isinstance(error, SQLAlchemyError) else "Redis"
            log.warning(
                "relay round failed; checkpoint kept, retrying",
                extra={
                    **ids,
                    "dependency": dependency,
                    "error": repr(error),
                    "consecutive_failures": failures,
                    "retry_in_s": round(delay, 2),
                },
            )
            await sleep_unless_stopped(stop, delay)
            continue
        if failures:
            log.info("relay recovered", extra={**ids, "failed_attempts": failures})
            failures = 0
        idle = relayed < batch_size
        if idle:
            await sleep_unless_stopped(stop, poll_interval_seconds)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep for `seconds`, returning early when `stop` is set unless the pause is short.

    An idle relay pauses hundreds of times a second, so a short pause is a plain sleep, which
    costs a fraction of a wait on `stop`. A stop request then waits for the pause to end.
    """
    if seconds <= SHORT_PAUSE_SECONDS:
        await asyncio.sleep(seconds)
    else:
        await sleep_unless_stopped(stop, seconds)


async def _trim_logging_errors(trim: Callable[[], Awaitable[int]], ids: dict[str, Any]) -> None:
    """Run `trim`, logging an unexpected error instead of stopping the relay.

    Trimming only bounds the stream's length, so a failed trim must not stop the relaying; the
    next interval tries again. Redis being down is raised, for the relay's own retry.
    """
    try:
        await trim()
    except RETRYABLE_ERRORS:
        raise
    except Exception:
        log.exception("stream trim failed; trying again at the next interval", extra=ids)
