"""The Redis read model: queries for the API and the version-gated writes of the projector.

An order or product is a hash with `json` (the public state), `version` and `hash` (its
`content_hash`). `rm:user-orders:<user>` scores order ids by creation time in epoch seconds, and
`rm:products` is the set of product ids. `services.cqrs.rebuild` refills these keys from the write
model under a staging prefix and switches them over in one step.
"""

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.exceptions import WatchError

from services.shared.clock import parse_timestamp
from services.shared.consistency import Decision, content_hash, decide
from services.shared.events import Event
from services.shared.migration_health import SYNC_CONFLICTS
from services.shared.names import (
    APPLY_COUNTS_TTL_SECONDS,
    READ_MODEL_PREFIX,
    READ_MODEL_REBUILD_KEY,
    apply_counts_key,
    order_key,
    product_key,
    products_index_key,
    user_orders_key,
)

from .states import ORDER, PRODUCT, InvalidState, event_state

log = logging.getLogger(__name__)

PROJECTED_AGGREGATES = frozenset({ORDER, PRODUCT})
# Maximum WATCH/MULTI attempts per event. Each failed attempt means that another projector changed
# the same key in between. After the last one the event fails and the consumer retries it later.
MAX_WATCH_ATTEMPTS = 50
# Attempts of a whole batch before the projector falls back to one event at a time, because a
# batch touches more keys and so loses the race more often when projectors run in parallel.
MAX_BATCH_WATCH_ATTEMPTS = 3
VERSION_POLL_SECONDS = 0.02


def state_key(aggregate: str, aggregate_id: str, prefix: str = READ_MODEL_PREFIX) -> str:
    if aggregate == ORDER:
        return order_key(aggregate_id, prefix)
    return product_key(aggregate_id, prefix)


async def read_state(client: "redis.Redis", key: str) -> dict[str, Any] | None:
    text = await client.hget(key, "json")
    if text is None:
        return None
    state: dict[str, Any] = json.loads(text)
    return state


async def read_order(client: "redis.Redis", order_id: str) -> dict[str, Any] | None:
    return await read_state(client, order_key(order_id))


async def read_product(client: "redis.Redis", product_id: str) -> dict[str, Any] | None:
    return await read_state(client, product_key(product_id))


async def read_order_version(client: "redis.Redis", order_id: str) -> int | None:
    version = await client.hget(order_key(order_id), "version")
    return None if version is None else int(version)


async def wait_for_order_version(
    client: "redis.Redis", order_id: str, version: int, timeout_seconds: float
) -> bool:
    """Poll until the read model contains `order_id` at `version` or later; False on timeout."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        stored = await read_order_version(client, order_id)
        if stored is not None and stored >= version:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(VERSION_POLL_SECONDS, remaining))


# Reads an index (KEYS[1]: a sorted set newest last, or a set) and the `json` field of each member's
# hash (ARGV[1]: the hash key prefix) in one script. Redis runs a script without interleaving
# other commands, so a listing never mixes the read model before and after a rebuild's switch.
_LIST_LUA = """
local ids
if redis.call('TYPE', KEYS[1])['ok'] == 'zset' then
    ids = redis.call('ZREVRANGE', KEYS[1], 0, -1)
else
    ids = redis.call('SMEMBERS', KEYS[1])
end
local states = {}
for _, id in ipairs(ids) do
    local state = redis.call('HGET', ARGV[1] .. id, 'json')
    if state then
        table.insert(states, state)
    end
end
return states
"""


async def _list_states(client: "redis.Redis", index_key: str, key_prefix: str) -> list[Any]:
    # An id can outlive its hash for a moment while a deletion is projected; the script skips it.
    texts = await client.eval(_LIST_LUA, 1, index_key, key_prefix)
    return [json.loads(text) for text in texts]


async def list_user_orders(client: "redis.Redis", user_id: str) -> list[dict[str, Any]]:
    """Return a user's orders, newest first."""
    return await _list_states(client, user_orders_key(user_id), order_key(""))


async def list_products(client: "redis.Redis") -> list[dict[str, Any]]:
    """Return every product, ordered by id."""
    products = await _list_states(client, products_index_key(), product_key(""))
    return sorted(products, key=lambda product: str(product["id"]))


async def project_event(client: "redis.Redis", event: Event, *, authority: str) -> Decision | None:
    """Apply an order or product event to the read model by version; None for other aggregates.

    The stored version is read under WATCH and the write runs in MULTI, so projectors running in
    parallel cannot replace a newer version with an older one. A deletion removes the keys when
    its version is at least the stored one, with the same results as the write model's apply.
    Each applied state adds one to its version's counter in `apply_counts_key`. While a rebuild
    runs (`READ_MODEL_REBUILD_KEY` exists), the event is also applied under the rebuild's staging
    prefix in the same MULTI. The rebuild key is watched too, so a transaction that raced with the
    start or the switch of a rebuild runs again.

    Returns the decision for the live read model. Raises InvalidState when the event's data is
    not a valid state of its aggregate.
    """
    if event.aggregate not in PROJECTED_AGGREGATES:
        return None
    state = event_state(event)
    change = _Change(
        aggregate=event.aggregate, state=state, deleted=event.deleted, origin=event.origin,
        score=_creation_score(state) if event.aggregate == ORDER else 0.0,
    )
    for _attempt in range(MAX_WATCH_ATTEMPTS):
        try:
            decision = await _project_once(client, change, authority)
        except WatchError:
            log.debug(
                "read model key changed during projection; retrying",
                extra={"subject": event.subject, "event_id": event.id},
            )
            continue
        _log_conflict(event, decision)
        return decision
    raise RuntimeError(
        f"Projecting event {event.id} onto {event.subject} lost the WATCH race "
        f"{MAX_WATCH_ATTEMPTS} times; the consumer retries it."
    )


async def project_events(
    client: "redis.Redis", events: Sequence[Event], *, authority: str
) -> list[Decision | None]:
    """Apply events in order to the read model as `project_event` does, in one WATCH/MULTI.

    Every key the batch reads is watched, so the batch applies only when no other client changed
    them meanwhile, and then atomically. Each event is decided against the writes of the events
    before it. The batch is tried `MAX_BATCH_WATCH_ATTEMPTS` times. Returns one decision per
    event, None for aggregates that are not projected. Raises InvalidState for the first event
    whose data is invalid, and WatchError when every attempt lost the race. Nothing is applied
    then.
    """
    changes: list[_Change | None] = []
    for event in events:
        if event.aggregate not in PROJECTED_AGGREGATES:
            changes.append(None)
            continue
        state = event_state(event)
        changes.append(_Change(
            aggregate=event.aggregate, state=state, deleted=event.deleted, origin=event.origin,
            score=_creation_score(state) if event.aggregate == ORDER else 0.0,
        ))
    projected = [change for change in changes if change is not None]
    if not projected:
        return [None] * len(changes)
    for attempt in range(1, MAX_BATCH_WATCH_ATTEMPTS + 1):
        try:
            decisions = iter(await _project_batch_once(client, projected, authority))
            break
        except WatchError:
            if attempt == MAX_BATCH_WATCH_ATTEMPTS:
                raise
            log.debug("read model keys changed during a batch projection; retrying",
                      extra={"count": len(projected), "attempt": attempt})
    results = [None if change is None else next(decisions) for change in changes]
    for event, decision in zip(events, results, strict=True):
        if decision is not None:
            _log_conflict(event, decision)
    return results


async def stage_state(
    client: "redis.Redis", prefix: str, aggregate: str, state: dict[str, Any], *, origin: str,
    authority: str,
) -> Decision:
    """Write a state under the staging `prefix` of a rebuild, gated by version like the projector.

    A newer state that the projector staged meanwhile is kept, and so is a deletion it staged.
    """
    change = _Change(
        aggregate=aggregate, state=state, deleted=False, origin=origin,
        score=_creation_score(state) if aggregate == ORDER else 0.0,
    )
    key = state_key(aggregate, state["id"], prefix)
    for _attempt in range(MAX_WATCH_ATTEMPTS):
        try:
            async with client.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                stored = await _read_stored(pipe, key)
                decision = _decide(stored, change, authority, staging=True)
                if not decision.applies:
                    await pipe.unwatch()  # type: ignore[no-untyped-call]
                    return decision
                pipe.multi()  # type: ignore[no-untyped-call]
                _queue_change(pipe, change, prefix, staging=True, stored=stored)
                await pipe.execute()
            return decision
        except WatchError:
            continue
    raise RuntimeError(
        f"Staging {aggregate} {state['id']!r} under {prefix} lost the WATCH race "
        f"{MAX_WATCH_ATTEMPTS} times; run the rebuild again."
    )


@dataclass(frozen=True)
class _Change:
    aggregate: str
    state: dict[str, Any]
    deleted: bool
    origin: str
    score: float  # an order's creation time in epoch seconds; 0 for products


@dataclass(frozen=True)
class _Stored:
    version: int | None
    hash: str | None
    # A staging tombstone: the entity was deleted at `version` while a rebuild ran, so the
    # snapshot must not bring back an older state of it.
    tombstone: bool


async def _read_stored(pipe: Any, key: str) -> _Stored:
    version, digest, deleted = await pipe.hmget(key, ["version", "hash", "deleted"])
    return _Stored(
        version=None if version is None else int(version),
        hash=None if digest is None else str(digest),
        tombstone=deleted is not None,
    )


def _decide(stored: _Stored, change: _Change, authority: str, *, staging: bool = False) -> Decision:
    incoming_version = int(change.state["version"])
    if stored.tombstone:
        assert stored.version is not None
        return Decision.APPLY if incoming_version > stored.version else Decision.STALE
    if change.deleted:
        if stored.version is None:
            # Staging records the deletion even of an entity it has not copied yet, because the
            # snapshot may still copy it from a write model that has not applied the deletion.
            return Decision.APPLY if staging else Decision.DUPLICATE
        return Decision.STALE if incoming_version < stored.version else Decision.APPLY
    return decide(
        local_version=stored.version,
        local_hash=stored.hash,
        incoming_version=incoming_version,
        incoming_hash=content_hash(change.state),
        incoming_origin=change.origin,
        authority=authority,
    )


async def _project_once(client: "redis.Redis", change: _Change, authority: str) -> Decision:
    live_key = state_key(change.aggregate, change.state["id"])
    async with client.pipeline(transaction=True) as pipe:
        await pipe.watch(live_key, READ_MODEL_REBUILD_KEY)
        staging = await pipe.get(READ_MODEL_REBUILD_KEY)
        live_stored = await _read_stored(pipe, live_key)
        decision = _decide(live_stored, change, authority)
        staging_decision = Decision.STALE
        staging_stored = _Stored(version=None, hash=None, tombstone=False)
        if staging is not None:
            staging_key = state_key(change.aggregate, change.state["id"], str(staging))
            await pipe.watch(staging_key)
            staging_stored = await _read_stored(pipe, staging_key)
            staging_decision = _decide(staging_stored, change, authority, staging=True)
        if not decision.applies and not staging_decision.applies:
            await pipe.unwatch()  # type: ignore[no-untyped-call]
            return decision
        pipe.multi()  # type: ignore[no-untyped-call]
        if decision.applies:
            _queue_change(pipe, change, READ_MODEL_PREFIX, staging=False, stored=live_stored)
        if staging_decision.applies:
            _queue_change(pipe, change, str(staging), staging=True, stored=staging_stored)
        await pipe.execute()
    return decision


async def _project_batch_once(
    client: "redis.Redis", changes: list[_Change], authority: str
) -> list[Decision]:
    live_keys = [state_key(change.aggregate, change.state["id"]) for change in changes]
    async with client.pipeline(transaction=True) as pipe:
        await pipe.watch(READ_MODEL_REBUILD_KEY, *dict.fromkeys(live_keys))
        # Read on another connection, in one round trip. A value read after the WATCH returned
        # is at least as new as at the WATCH, and a change after the WATCH fails the EXEC, so
        # the reads are as safe as reads on the watching connection.
        staging, live_stored = await _read_stored_many(client, live_keys)
        staging_keys: list[str] = []
        staging_stored: dict[str, _Stored] = {}
        if staging is not None:
            staging_keys = [
                state_key(change.aggregate, change.state["id"], staging) for change in changes
            ]
            await pipe.watch(*dict.fromkeys(staging_keys))
            _, staging_stored = await _read_stored_many(client, staging_keys)

        # Decide in order, as if each earlier write of the batch were already stored.
        decisions: list[Decision] = []
        # change, prefix, staging, and what is stored before the write
        writes: list[tuple[_Change, str, bool, _Stored]] = []
        for index, change in enumerate(changes):
            key = live_keys[index]
            decision = _decide(live_stored[key], change, authority)
            decisions.append(decision)
            if decision.applies:
                writes.append((change, READ_MODEL_PREFIX, False, live_stored[key]))
                live_stored[key] = _stored_after(change, staging=False)
            if staging is not None:
                key = staging_keys[index]
                if _decide(staging_stored[key], change, authority, staging=True).applies:
                    writes.append((change, staging, True, staging_stored[key]))
                    staging_stored[key] = _stored_after(change, staging=True)
        if not writes:
            await pipe.unwatch()  # type: ignore[no-untyped-call]
            return decisions
        pipe.multi()  # type: ignore[no-untyped-call]
        for change, prefix, is_staging, stored in writes:
            _queue_change(pipe, change, prefix, staging=is_staging, stored=stored)
        await pipe.execute()
    return decisions


async def _read_stored_many(
    client: "redis.Redis", keys: list[str]
) -> tuple[str | None, dict[str, _Stored]]:
    """Return the rebuild's staging prefix (None when no rebuild runs) and the stored version of
    each key."""
    unique = list(dict.fromkeys(keys))
    async with client.pipeline(transaction=False) as reads:
        reads.get(READ_MODEL_REBUILD_KEY)
        for key in unique:
            reads.hmget(key, ["version", "hash", "deleted"])
        staging, *replies = await reads.execute()
    stored = {
        key: _Stored(
            version=None if version is None else int(version),
            hash=None if digest is None else str(digest),
            tombstone=deleted is not None,
        )
        for key, (version, digest, deleted) in zip(unique, replies, strict=True)
    }
    return None if staging is None else str(staging), stored


def _stored_after(change: _Change, *, staging: bool) -> _Stored:
    """Return what `_queue_change` leaves stored for `change`."""
    version = int(change.state["version"])
    if change.deleted:
        if staging:
            return _Stored(version=version, hash=None, tombstone=True)
        return _Stored(version=None, hash=None, tombstone=False)
    return _Stored(version=version, hash=content_hash(change.state), tombstone=False)


def _queue_change(
    pipe: Any, change: _Change, prefix: str, *, staging: bool, stored: _Stored
) -> None:
    """Queue the writes of `change`; `stored` is the key's current version and tombstone."""
    state = change.state
    key = state_key(change.aggregate, state["id"], prefix)
    index_key = (
        user_orders_key(state["user_id"], prefix) if change.aggregate == ORDER
        else products_index_key(prefix)
    )
    if change.deleted:
        pipe.delete(key)
        # NOTE: the live model keeps no tombstone, so an older event of the same aggregate that is
        # projected after the deletion creates the entry again.
        if staging:
            pipe.hset(key, mapping={"version": state["version"], "deleted": "1"})
        if change.aggregate == ORDER:
            pipe.zrem(index_key, state["id"])
        else:
            pipe.srem(index_key, state["id"])
        return
    if stored.tombstone:
        # The HSET below sets the fields every state has, so only a tombstone's `deleted` field
        # would outlive it.
        pipe.delete(key)
    encoded = json.dumps(state, sort_keys=True, separators=(",", ":"))
    pipe.hset(
        key, mapping={"json": encoded, "version": state["version"], "hash": content_hash(state)}
    )
    if change.aggregate == ORDER:
        pipe.zadd(index_key, {state["id"]: change.score})
    else:
        pipe.sadd(index_key, state["id"])
    if not staging:
        counts_key = apply_counts_key(change.aggregate, state["id"])
        pipe.hincrby(counts_key, str(state["version"]), 1)
        pipe.expire(counts_key, APPLY_COUNTS_TTL_SECONDS)


def _creation_score(state: dict[str, Any]) -> float:
    try:
        return parse_timestamp(state["created_at"]).timestamp()
    except ValueError as error:
        raise InvalidState(
            f"Order {state['id']!r} has created_at {state['created_at']!r}, which is not of the "
            "form 2026-01-31T12:00:00.000000Z."
        ) from error


def _log_conflict(event: Event, decision: Decision) -> None:
    if decision.conflict:
        SYNC_CONFLICTS.labels("cqrs-read", decision.value).inc()
        log.warning(
            "conflicting state received by the read model",
            extra={"aggregate": event.aggregate, "aggregate_id": event.aggregate_id,
                   "version": event.aggregate_version, "event_id": event.id,
                   "origin": event.origin, "resolution": decision.value},
        )
