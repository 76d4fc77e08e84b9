"""Read model rebuild: refills the Redis read model from the write model while the projector runs.

1. Take the rebuild lease: `READ_MODEL_REBUILD_KEY` gets a new staging prefix, only if no other
   rebuild holds it. From then on the projector applies every event under both the live and the
   staging prefix (see `read_model.project_event`).
2. Wait until CDC ingest has acknowledged every `cdc.monolith` entry that the projector had read
   when the lease was taken. The projector can apply a monolith change before ingest writes it to
   the write model, and it would not stage a change it had already applied.
3. Copy every order and product of the write model under the staging prefix, gated by version, so
   a newer state or a deletion that the projector staged meanwhile is kept.
4. Switch in one Lua script: delete the live keys, rename the staging keys onto the live prefix,
   drop the deletion markers and release the lease. Redis runs a script without interleaving any
   other command, so a query sees either the old read model or the new one, never a mixture.

The lease expires unless renewed, so a rebuild that dies stops the projector's double writes and
leaves only staging keys, which the next rebuild deletes.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError
from sqlalchemy import Engine, Table, select

from services.shared.names import (
    CDC_STREAM,
    INGEST_GROUP,
    PROJECTOR_GROUP,
    READ_MODEL_PREFIX,
    READ_MODEL_REBUILD_KEY,
    READ_MODEL_REBUILD_LEASE_SECONDS,
    READ_MODEL_STAGING_PREFIX,
    read_model_patterns,
)
from services.shared.streams import parse_entry_id

from .read_model import stage_state
from .schema import orders, products
from .states import ORDER, PRODUCT
from .write_model import reading, row_to_state

log = logging.getLogger(__name__)

# Rows read from the write model per read transaction.
SNAPSHOT_BATCH_SIZE = 500
INGEST_POLL_SECONDS = 0.1

# Renews the lease only while it still names this rebuild's staging prefix.
_RENEW_LEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE_LEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1]: the rebuild key. ARGV[1]: staging prefix, ARGV[2]: live prefix, ARGV[3..]: patterns of
# the live keys. Returns {live keys deleted, staging keys moved}.
# NOTE: KEYS scans the whole keyspace while Redis runs nothing else; on a database of millions of
# keys the switch blocks Redis for that scan.
_SWITCH_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return redis.error_reply('the rebuild lease expired or belongs to another rebuild')
end
local deleted = 0
for index = 3, #ARGV do
    for _, key in ipairs(redis.call('KEYS', ARGV[index])) do
        redis.call('DEL', key)
        deleted = deleted + 1
    end
end
local moved = 0
local staging = ARGV[1]
for _, key in ipairs(redis.call('KEYS', staging .. ':*')) do
    local kind = redis.call('TYPE', key)['ok']
    if kind == 'hash' and redis.call('HEXISTS', key, 'deleted') == 1 then
        redis.call('DEL', key)
    else
        redis.call('RENAME', key, ARGV[2] .. string.sub(key, #staging + 1))
        moved = moved + 1
    end
end
redis.call('DEL', KEYS[1])
return {deleted, moved}
"""


class RebuildError(RuntimeError):
    """The rebuild could not run or finish; the live read model is unchanged."""


@dataclass(frozen=True)
class RebuildResult:
    staging_prefix: str
    orders: int  # orders copied from the write model
    products: int
    live_keys_deleted: int
    keys_switched: int
    seconds: float


async def rebuild_read_model(
    engine: Engine,
    client: "redis.Redis",
    *,
    authority: str,
    ingest_wait_seconds: float = 60.0,
    lease_seconds: int = READ_MODEL_REBUILD_LEASE_SECONDS,
) -> RebuildResult:
    """Rebuild the read model from the write model and switch to it atomically.

    Raises RebuildError when another rebuild holds the lease, when CDC ingest does not catch up
    within `ingest_wait_seconds`, or when the lease is lost before the switch.
    """
    started = time.monotonic()
    staging = f"{READ_MODEL_STAGING_PREFIX}:{uuid.uuid4().hex}"
    ids = {"staging_prefix": staging}
    if not await client.set(READ_MODEL_REBUILD_KEY, staging, nx=True, ex=lease_seconds):
        holder = await client.get(READ_MODEL_REBUILD_KEY)
        raise RebuildError(
            f"Another rebuild is running with staging prefix {holder!r}; wait for it to finish, "
            f"or for its lease to expire within {lease_seconds} s if it died."
        )
    log.info("read model rebuild started", extra=ids)
    try:
        async with _renewing_lease(client, staging, lease_seconds):
            await _delete_stale_staging(client, staging)
            await _wait_for_ingest(client, ingest_wait_seconds)
            order_count = await _stage_table(engine, client, orders, ORDER, staging, authority)
            product_count = await _stage_table(
                engine, client, products, PRODUCT, staging, authority
            )
            deleted, moved = await client.eval(
                _SWITCH_LUA, 1, READ_MODEL_REBUILD_KEY, staging, READ_MODEL_PREFIX,
                *read_model_patterns(READ_MODEL_PREFIX),
            )
    except BaseException:
        await _abandon(client, staging)
        raise
    result = RebuildResult(
        staging_prefix=staging, orders=order_count, products=product_count,
        live_keys_deleted=int(deleted), keys_switched=int(moved),
        seconds=time.monotonic() - started,
    )
    log.info(
        "read model rebuilt",
        extra={**ids, "orders": result.orders, "products": result.products,
               "live_keys_deleted": result.live_keys_deleted,
               "keys_switched": result.keys_switched, "seconds": round(result.seconds, 3)},
    )
    return result


@contextlib.asynccontextmanager
async def _renewing_lease(
    client: "redis.Redis", staging: str, lease_seconds: int
) -> AsyncIterator[None]:
    async def renew() -> None:
        while True:
            await asyncio.sleep(lease_seconds / 3)
            renewed = await client.eval(
                _RENEW_LEASE_LUA, 1, READ_MODEL_REBUILD_KEY, staging, str(lease_seconds)
            )
            if not renewed:
                log.error("read model rebuild lost its lease", extra={"staging_prefix": staging})
                return

    task = asyncio.create_task(renew())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait({task})


async def _delete_stale_staging(client: "redis.Redis", staging: str) -> None:
    """Delete the staging keys of earlier rebuilds that died before their switch."""
    stale = 0
    async for key in client.scan_iter(match=f"{READ_MODEL_STAGING_PREFIX}:*", count=1000):
        if not str(key).startswith(f"{staging}:"):
            await client.delete(key)
            stale += 1
    if stale:
        log.info("deleted staging keys of an earlier rebuild", extra={"keys": stale})


async def _group_info(client: "redis.Redis", group: str) -> dict[str, Any] | None:
    if not await client.exists(CDC_STREAM):
        return None
    for info in await client.xinfo_groups(CDC_STREAM):
        if info["name"] == group:
            return dict(info)
    return None


async def _wait_for_ingest(client: "redis.Redis", timeout_seconds: float) -> None:
    """Wait until CDC ingest has acknowledged every CDC entry the projector had read by now."""
    projector = await _group_info(client, PROJECTOR_GROUP)
    if projector is None:
        return
    target = parse_entry_id(str(projector["last-delivered-id"]))
    if target == (0, 0):
        return
    deadline = time.monotonic() + timeout_seconds
    while True:
        ingest = await _group_info(client, INGEST_GROUP)
        if ingest is not None and parse_entry_id(str(ingest["last-delivered-id"])) >= target:
            if int(ingest["pending"]) == 0:
                return
            oldest = (await client.xpending(CDC_STREAM, INGEST_GROUP))["min"]
            # None: ingest acknowledged its last pending entry since XINFO.
            if oldest is None or parse_entry_id(str(oldest)) > target:
                return
        if time.monotonic() > deadline:
            raise RebuildError(
                f"CDC ingest did not acknowledge {CDC_STREAM} up to entry "
                f"{projector['last-delivered-id']} within {timeout_seconds} s; check that the "
                "cdc-ingest worker runs, then rebuild again."
            )
        await asyncio.sleep(INGEST_POLL_SECONDS)


def _read_rows(engine: Engine, table: Table, aggregate: str, after_id: str) -> list[Any]:
    query = select(table).where(table.c.id > after_id).order_by(table.c.id)
    with reading(engine) as connection:
        rows = connection.execute(query.limit(SNAPSHOT_BATCH_SIZE)).all()
    return [(row_to_state(aggregate, row), row.origin) for row in rows]


async def _stage_table(
    engine: Engine, client: "redis.Redis", table: Table, aggregate: str, staging: str,
    authority: str,
) -> int:
    """Copy every row of `table` under the staging prefix; return the number of rows."""
    copied = 0
    after_id = ""
    while True:
        rows = await asyncio.to_thread(_read_rows, engine, table, aggregate, after_id)
        if not rows:
            return copied
        for state, origin in rows:
            await stage_state(client, staging, aggregate, state, origin=origin, authority=authority)
        copied += len(rows)
        after_id = rows[-1][0]["id"]


async def _abandon(client: "redis.Redis", staging: str) -> None:
    """Release the lease of a failed rebuild and delete its staging keys.

    A failure here is logged and left to the lease expiry and the next rebuild, so that the error
    that stopped the rebuild is the one raised.
    """
    try:
        await client.eval(
            _RELEASE_LEASE_LUA, 1, READ_MODEL_REBUILD_KEY, staging
        )
        async for key in client.scan_iter(match=f"{staging}:*", count=1000):
            await client.delete(key)
    except (RedisError, OSError) as error:
        log.warning(
            "could not clean up after a failed rebuild; the lease expires by itself",
            extra={"staging_prefix": staging, "error": repr(error)},
        )
    log.warning("read model rebuild abandoned; the live read model is unchanged",
                extra={"staging_prefix": staging})
