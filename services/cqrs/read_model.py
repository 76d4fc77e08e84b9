"""The Redis read model: queries for the API and the version-gated writes of the projector.

An order or product is a hash with `json` (the public state), `version` and `hash` (its
`content_hash`). `rm:user-orders:<user>` scores order ids by creation time in epoch seconds, and
`rm:products` is the set of product ids.
"""

import asyncio
import json
import logging
import time
from typing import Any

import redis.asyncio as redis
from redis.exceptions import WatchError

from services.shared.clock import parse_timestamp
from services.shared.consistency import Decision, content_hash, decide
from services.shared.events import Event
from services.shared.names import order_key, product_key, products_index_key, user_orders_key

from .states import ORDER, PRODUCT, InvalidState, event_state

log = logging.getLogger(__name__)

PROJECTED_AGGREGATES = frozenset({ORDER, PRODUCT})
# Maximum WATCH/MULTI attempts per event. Each failed attempt means that another projector changed
# the same key in between. After the last one the event fails and the consumer retries it later.
MAX_WATCH_ATTEMPTS = 50
VERSION_POLL_SECONDS = 0.02


def state_key(aggregate: str, aggregate_id: str) -> str:
    return order_key(aggregate_id) if aggregate == ORDER else product_key(aggregate_id)


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


async def _read_many(client: "redis.Redis", keys: list[str]) -> list[dict[str, Any]]:
    if not keys:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hget(key, "json")
        texts = await pipe.execute()
    # An id can outlive its hash for a moment while a deletion is projected; skip those.
    return [json.loads(text) for text in texts if text is not None]


async def list_user_orders(client: "redis.Redis", user_id: str) -> list[dict[str, Any]]:
    """Return a user's orders, newest first."""
    order_ids = await client.zrevrange(user_orders_key(user_id), 0, -1)
    return await _read_many(client, [order_key(str(order_id)) for order_id in order_ids])


async def list_products(client: "redis.Redis") -> list[dict[str, Any]]:
    """Return every product, ordered by id."""
    product_ids = sorted(str(member) for member in await client.smembers(products_index_key()))
    return await _read_many(client, [product_key(product_id) for product_id in product_ids])


async def project_event(client: "redis.Redis", event: Event, *, authority: str) -> Decision | None:
    """Apply an order or product event to the read model by version; None for other aggregates.

    The stored version is read under WATCH and the write runs in MULTI, so projectors running in
    parallel cannot replace a newer version with an older one. A deletion removes the keys when
    its version is at least the stored one, with the same results as the write model's apply.

    Raises InvalidState when the event's data is not a valid state of its aggregate.
    """
    if event.aggregate not in PROJECTED_AGGREGATES:
        return None
    state = event_state(event)
    key = state_key(event.aggregate, event.aggregate_id)
    score = _creation_score(state) if event.aggregate == ORDER else 0.0
    for _attempt in range(MAX_WATCH_ATTEMPTS):
        try:
            return await _project_once(client, event, state, key, score, authority)
        except WatchError:
            log.debug(
                "read model key changed during projection; retrying",
                extra={"key": key, "event_id": event.id},
            )
    raise RuntimeError(
        f"Projecting event {event.id} onto {key} lost the WATCH race {MAX_WATCH_ATTEMPTS} times; "
        "the consumer retries it."
    )


async def _project_once(
    client: "redis.Redis",
    event: Event,
    state: dict[str, Any],
    key: str,
    score: float,
    authority: str,
) -> Decision:
    async with client.pipeline(transaction=True) as pipe:
        await pipe.watch(key)
        stored_version, stored_hash = await pipe.hmget(key, ["version", "hash"])
        local_version = None if stored_version is None else int(stored_version)
        if event.deleted:
            decision = _deletion_decision(local_version, state["version"])
        else:
            decision = decide(
                local_version=local_version,
                local_hash=None if stored_hash is None else str(stored_hash),
                incoming_version=state["version"],
                incoming_hash=content_hash(state),
                incoming_origin=event.origin,
                authority=authority,
            )
        if not decision.applies:
            await pipe.unwatch()  # type: ignore[no-untyped-call]
            _log_conflict(event, decision)
            return decision
        pipe.multi()  # type: ignore[no-untyped-call]
        if event.deleted:
            _queue_deletion(pipe, event.aggregate, state, key)
        else:
            _queue_write(pipe, event.aggregate, state, key, score)
        await pipe.execute()
    _log_conflict(event, decision)
    return decision


def _deletion_decision(local_version: int | None, incoming_version: int) -> Decision:
    if local_version is None:
        return Decision.DUPLICATE
    return Decision.STALE if incoming_version < local_version else Decision.APPLY


def _queue_write(pipe: Any, aggregate: str, state: dict[str, Any], key: str, score: float) -> None:
    encoded = json.dumps(state, sort_keys=True, separators=(",", ":"))
    pipe.hset(
        key, mapping={"json": encoded, "version": state["version"], "hash": content_hash(state)}
    )
    if aggregate == ORDER:
        pipe.zadd(user_orders_key(state["user_id"]), {state["id"]: score})
    else:
        pipe.sadd(products_index_key(), state["id"])


def _queue_deletion(pipe: Any, aggregate: str, state: dict[str, Any], key: str) -> None:
    # NOTE: keys are removed without a tombstone, so an older event of the same aggregate that is
    # projected after the deletion creates the entry again.
    pipe.delete(key)
    if aggregate == ORDER:
        pipe.zrem(user_orders_key(state["user_id"]), state["id"])
    else:
        pipe.srem(products_index_key(), state["id"])


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
        log.warning(
            "conflicting state received by the read model",
            extra={"aggregate": event.aggregate, "aggregate_id": event.aggregate_id,
                   "version": event.aggregate_version, "event_id": event.id,
                   "origin": event.origin, "resolution": decision.value},
        )
