"""Per-user replication markers: has every monolith change of a user reached the CQRS side?

The CDC relay appends each order change to `cdc.monolith` with `append_marked`, which raises
`gate:published[user]` to the new entry id in the same script, so the marker is never ahead of or
behind the stream. The ingest and projector groups raise `gate:applied:<group>[user]` with
`queue_raise_applied` in the transaction that acknowledges the entry. A user is replicated when
both applied markers have reached the published one.

NOTE: a marker is a maximum, not a watermark. Two consumers of one group that acknowledge out of
order (a later entry first, while an earlier one of the same user is still being handled or
retried) raise it past an entry that is not applied yet. The marker stays ahead while the earlier
entry is in hand, or for good when that entry is dead-lettered. The guard's dead-letter threshold
catches the second case.
"""

from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from .events import Event
from .names import CDC_STREAM, GATE_GROUPS, GATE_PUBLISHED_KEY, gate_applied_key
from .streams import AckHook, parse_entry_id

# Lua compares ids as (ms, seq) pairs; both parts fit a Lua number exactly (ms < 2^53).
_RAISE_FUNCTION = """
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function raise(key, field, id)
  local current = redis.call('HGET', key, field)
  if current then
    local cms, cseq = parse(current)
    local nms, nseq = parse(id)
    if cms and (cms > nms or (cms == nms and cseq >= nseq)) then return 0 end
  end
  redis.call('HSET', key, field, id)
  return 1
end
"""

# KEYS[1] hash, ARGV[1] field, ARGV[2] entry id: sets the field to the id unless it contains a
# larger one. Returns 1 when it moved.
RAISE_SCRIPT = _RAISE_FUNCTION + "return raise(KEYS[1], ARGV[1], ARGV[2])\n"

# KEYS[1] stream, KEYS[2] published hash, ARGV[1] user id, ARGV[2..] the entry's field/value
# pairs: appends the entry and raises the user's published marker to its id. Returns the id.
APPEND_MARKED_SCRIPT = (
    _RAISE_FUNCTION
    + """
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
raise(KEYS[2], ARGV[1], id)
return id
"""
)


def order_user(aggregate: str, data: Mapping[str, Any]) -> str | None:
    """Return the user an event is about when it is an order's, else None."""
    if aggregate != "order":
        return None
    user_id = data.get("user_id")
    return user_id if isinstance(user_id, str) and user_id else None


def queue_append_marked(
    pipe: Pipeline, stream: str, user_id: str, fields: Mapping[str, str]
) -> None:
    """Queue the append of `fields` to `stream` that also raises `user_id`'s published marker.

    The pipeline's reply for it is the new entry id.
    """
    args: list[str] = [user_id]
    for name, value in fields.items():
        args.extend((name, value))
    # EVAL rather than EVALSHA: the pipeline stays one round trip, and Redis caches the compiled
    # script by its hash anyway.
    pipe.eval(APPEND_MARKED_SCRIPT, 2, stream, GATE_PUBLISHED_KEY, *args)


def queue_raise_applied(pipe: Pipeline, group: str, user_id: str, entry_id: str) -> None:
    """Queue raising `group`'s applied marker of `user_id` to `entry_id`."""
    pipe.eval(RAISE_SCRIPT, 1, gate_applied_key(group), user_id, entry_id)


def applied_marker(group: str) -> AckHook:
    """Return the acknowledgement hook that raises `group`'s applied marker for order entries of
    `cdc.monolith`, in the transaction that acknowledges them."""

    def raise_marker(pipe: Pipeline, stream: str, entry_id: str, event: Event) -> None:
        if stream != CDC_STREAM:
            return
        user_id = order_user(event.aggregate, event.data)
        if user_id is not None:
            queue_raise_applied(pipe, group, user_id, entry_id)

    return raise_marker


async def is_replicated(redis: Redis, user_id: str) -> bool:
    """True when the user has no published marker, or every gated group has applied up to it."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hget(GATE_PUBLISHED_KEY, user_id)
        for group in GATE_GROUPS:
            pipe.hget(gate_applied_key(group), user_id)
        published, *applied = await pipe.execute()
    if published is None:
        return True
    target = parse_entry_id(_text(published))
    return all(mark is not None and parse_entry_id(_text(mark)) >= target for mark in applied)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
