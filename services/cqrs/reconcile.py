"""The reconciler: compares orders and products across the monolith, the CQRS write model and the
Redis read model, and repairs drift by re-emitting the newest state.

It reads each source over its internal API (`/internal/reconcile/...`, with the CQRS side's service
token) and the read model straight from Redis, so it runs anywhere the CQRS workers run.

A run works as of the stream positions it records at its start. An entity that differs while it
still has work in flight (a change-log or outbox row not relayed yet, or an entry of `cdc.monolith`
or `events.cqrs` that a group which must apply it has not acknowledged) is not drift yet. The run
re-reads only the differing entities until each one either agrees, or differs in the same way in
two reads with no work in flight, or `wait_seconds` pass. Entities still changing at the deadline
are reported apart and not counted as drift.

A repair appends the newest state in a CloudEvents envelope to the stream that reaches the lagging
side: a monolith state to `cdc.monolith` with origin `monolith`, a write-model state to
`events.cqrs` with origin `cqrs`. Receivers apply by version, so a repeated repair is harmless.
The read model is a projection and never a source. A read-model entry is removed when no source
contains it, when it is newer than every source, or when its content differs at the same version.
The removal happens only while the entry still has the version read, and the source's state is
then re-emitted.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import redis.asyncio as redis
from pydantic import Field
from redis import exceptions as redis_errors

from services.shared.consistency import content_hash
from services.shared.events import Event
from services.shared.names import (
    CDC_STREAM,
    CQRS_STREAM,
    ORIGIN_CQRS,
    ORIGIN_MONOLITH,
    STREAM_GROUPS,
    order_key,
    product_key,
    products_index_key,
    user_orders_key,
)
from services.shared.reconciliation import (
    KINDS,
    ORDER,
    Digest,
    Drift,
    EntityKey,
    Problem,
    Report,
    Side,
    compare_all,
    newest_side,
    store_report,
)
from services.shared.streams import TransientFailure, append, connect, parse_entry_id

from .settings import Settings
from .workers.reverse_sync import ServiceTokenClient

log = logging.getLogger(__name__)

EVENT_SOURCE = "/reconciler"
REPAIR_ACTION = "updated"
# Ids per digest request when re-reading single entities; keeps the query string short.
IDS_PER_REQUEST = 100
STREAM_PAGE = 1000
REQUEST_TIMEOUT_SECONDS = 30.0


class ReconcileSettings(Settings):
    """The CQRS settings plus the reconciler's own, also read from `CQRS_*` variables."""

    # Base URL of the CQRS service's API, whose /internal/reconcile routes serve the write model.
    service_url: str = "http://127.0.0.1:8002"
    # Maximum seconds a run waits for in-flight work on differing entities, per comparison.
    reconcile_wait_seconds: float = Field(5.0, ge=0, le=600)
    # Pause in seconds between re-reads of the differing entities.
    reconcile_poll_seconds: float = Field(0.2, gt=0, le=60)


class ReconcileError(Exception):
    """A side could not be read: a service, the auth server or Redis failed or refused."""


class InternalApi:
    """Client of the `/internal/reconcile` routes of the monolith and the CQRS service."""

    def __init__(
        self, http: httpx.AsyncClient, tokens: ServiceTokenClient, *, monolith_url: str,
        cqrs_url: str,
    ) -> None:
        self.http = http
        self.tokens = tokens
        self.base_urls = {Side.MONOLITH: monolith_url.rstrip("/"),
                          Side.WRITE_MODEL: cqrs_url.rstrip("/")}

    async def get(self, side: Side, path: str, params: Any = None) -> dict[str, Any]:
        """GET an internal route of `side`; raise ReconcileError naming the URL on any failure."""
        url = f"{self.base_urls[side]}/internal/reconcile/{path}"
        response = await self._get(url, params)
        if response.status_code == 401:
            self.tokens.invalidate()
            response = await self._get(url, params)
        if response.status_code != 200:
            raise ReconcileError(
                f"GET {url} returned HTTP {response.status_code}: {response.text[:300]}; check "
                "that the service runs this version and accepts the CQRS sync client."
            )
        body: dict[str, Any] = response.json()
        return body

    async def _get(self, url: str, params: Any) -> httpx.Response:
        try:
            token = await self.tokens.token()
            return await self.http.get(
                url, params=params, headers={"Authorization": f"Bearer {token}"}
            )
        except TransientFailure as error:
            raise ReconcileError(f"No service token for {url}: {error}") from error
        except httpx.HTTPError as error:
            raise ReconcileError(f"GET {url} failed: {error!r}; is the service up?") from error

    async def digests(
        self, side: Side, kind: str, ids: list[str] | None = None
    ) -> dict[EntityKey, Digest]:
        """Return the digests of every `kind` entity of `side`, or of the listed `ids`."""
        found: dict[EntityKey, Digest] = {}
        if ids is not None:
            for start in range(0, len(ids), IDS_PER_REQUEST):
                chunk = ids[start:start + IDS_PER_REQUEST]
                page = await self.get(side, f"digests/{quote(kind)}", [("id", i) for i in chunk])
                found.update(_digests(page))
            return found
        after: str | None = ""
        while after is not None:
            page = await self.get(side, f"digests/{quote(kind)}", {"after": after})
            found.update(_digests(page))
            after = page.get("next_after")
        return found

    async def unrelayed(self, side: Side) -> list[dict[str, Any]]:
        entities: list[dict[str, Any]] = (await self.get(side, "unrelayed"))["entities"]
        return entities

    async def conflicts(self, side: Side, limit: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = (
            await self.get(side, "conflicts", {"limit": limit})
        )["conflicts"]
        return rows


def _digests(page: dict[str, Any]) -> dict[EntityKey, Digest]:
    digests = (Digest.from_json(item) for item in page["items"])
    return {(digest.kind, digest.id): digest for digest in digests}


def _state_key(kind: str, entity_id: str) -> str:
    return order_key(entity_id) if kind == ORDER else product_key(entity_id)


async def read_model_digests(
    client: "redis.Redis", keys: Iterable[EntityKey] | None = None
) -> dict[EntityKey, Digest]:
    """Return the read model's digests of `keys`, or of every order and product.

    The hash is computed from the stored JSON, not taken from the `hash` field, so an edit of the
    JSON alone shows as drift.
    """
    if keys is None:
        requested: list[EntityKey] = []
        for kind in KINDS:
            prefix = _state_key(kind, "")
            async for key in client.scan_iter(match=f"{prefix}*", count=1000):
                requested.append((kind, str(key)[len(prefix):]))
    else:
        requested = list(keys)
    async with client.pipeline(transaction=False) as pipe:
        for kind, entity_id in requested:
            pipe.hmget(_state_key(kind, entity_id), ["json", "version"])
        replies = await pipe.execute()
    found: dict[EntityKey, Digest] = {}
    for (kind, entity_id), (text, version) in zip(requested, replies, strict=True):
        if text is None or version is None:
            continue
        found[(kind, entity_id)] = _read_model_digest(kind, entity_id, text, version)
    return found


def _read_model_digest(kind: str, entity_id: str, text: str, version: str) -> Digest:
    try:
        state = json.loads(text)
        digest = content_hash(state)
    except (ValueError, TypeError, AttributeError):
        state, digest = {"json": text}, "invalid-json"
    try:
        number = int(version)
    except ValueError:
        number = -1
    return Digest(kind=kind, id=entity_id, version=number, hash=digest, state=state)


@dataclass(frozen=True)
class Flight:
    """Entities with work in flight, and the positions they were read at."""

    entities: set[EntityKey]
    as_of: dict[str, Any]


class Reconciler:
    """One reconciler with its connections; `run` performs a whole reconcile run."""

    def __init__(
        self, api: InternalApi, client: "redis.Redis", *, authority: str, wait_seconds: float,
        poll_seconds: float,
    ) -> None:
        self.api = api
        self.redis = client
        self.authority = authority
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds

    async def run(self, *, repair: bool = False) -> Report:
        """Compare every entity, repair when asked, store the report in `reconcile:last`.

        Raises ReconcileError when a side cannot be read.
        """
        report = Report(started_at=time.time(), authority=self.authority)
        try:
            report.as_of = (await self.in_flight()).as_of
            drifts, unsettled = await self.find_drift()
            if repair and drifts:
                report.before_repair = Report(0, self.authority, drifts=drifts).counts()
                report.repaired = await self.repair(drifts)
                drifts, unsettled = await self.find_drift()
            report.drifts, report.in_flight = drifts, unsettled
            report.finished_at = time.time()
            await store_report(self.redis, report)
        except redis_errors.RedisError as error:
            raise ReconcileError(f"Redis failed during the reconcile run: {error!r}") from error
        log.info(
            "reconcile run finished",
            extra={**report.counts(), "drift_entities": report.drift_entities,
                   "in_flight": len(report.in_flight), "repaired": report.repaired,
                   "duration_s": round(report.duration_seconds, 3),
                   "entity_ids": [f"{d.kind}/{d.id}" for d in report.drifts][:50]},
        )
        return report

    async def observe(
        self, keys: list[EntityKey] | None = None
    ) -> dict[Side, dict[EntityKey, Digest]]:
        """Read the digests of `keys`, or of every entity, from the three sides."""
        sides: dict[Side, dict[EntityKey, Digest]] = {}
        for side in (Side.MONOLITH, Side.WRITE_MODEL):
            digests: dict[EntityKey, Digest] = {}
            for kind in KINDS:
                ids = None if keys is None else [i for k, i in keys if k == kind]
                if ids == []:
                    continue
                digests.update(await self.api.digests(side, kind, ids))
            sides[side] = digests
        sides[Side.READ_MODEL] = await read_model_digests(self.redis, keys)
        return sides

    async def find_drift(self) -> tuple[list[Drift], list[Drift]]:
        """Return the settled drift and the entities still changing when the wait ended."""
        observed = compare_all(await self.observe(), self.authority)
        deadline = time.monotonic() + self.wait_seconds
        while observed:
            flight = (await self.in_flight()).entities
            await asyncio.sleep(self.poll_seconds)
            current = compare_all(await self.observe(list(observed)), self.authority)
            settled = {
                key: drift for key, drift in current.items()
                if key not in flight and observed[key].fingerprint == drift.fingerprint
            }
            if len(settled) == len(current) or time.monotonic() >= deadline:
                unsettled = [drift for key, drift in current.items() if key not in settled]
                return list(settled.values()), unsettled
            observed = current
        return [], []

    async def in_flight(self) -> Flight:
        """Return the entities with unrelayed rows or unacknowledged stream entries."""
        entities: set[EntityKey] = set()
        unrelayed: dict[str, int] = {}
        for side in (Side.MONOLITH, Side.WRITE_MODEL):
            rows = await self.api.unrelayed(side)
            unrelayed[side.value] = len(rows)
            entities.update((str(row["kind"]), str(row["id"])) for row in rows)
        positions: dict[str, str | None] = {}
        for stream, groups in STREAM_GROUPS.items():
            last_id, subjects = await self._unacknowledged(stream, groups)
            positions[stream] = last_id
            entities.update(subjects)
        return Flight(entities, {"streams": positions, "unrelayed": unrelayed})

    async def _unacknowledged(
        self, stream: str, groups: tuple[str, ...]
    ) -> tuple[str | None, set[EntityKey]]:
        """Return the stream's last entry id and the entities of entries some group still owes.

        Reads from the lowest position any group has not acknowledged, so entries that one group
        acknowledged but another has not are included.
        """
        if not await self.redis.exists(stream):
            return None, set()
        info = await self.redis.xinfo_stream(stream)
        last_id = str(info["last-generated-id"])
        known = {str(group["name"]): group for group in await self.redis.xinfo_groups(stream)}
        floors: list[tuple[tuple[int, int], str]] = []
        for name in groups:
            group = known.get(name)
            if group is None:  # not created yet: it owes every entry
                floors.append(((0, 0), "-"))
                continue
            delivered = str(group["last-delivered-id"])
            floors.append((parse_entry_id(delivered), f"({delivered}"))
            if int(group["pending"]) > 0:
                summary = await self.redis.xpending(stream, name)
                if summary["min"] is not None:
                    floors.append((parse_entry_id(str(summary["min"])), str(summary["min"])))
        start = min(floors)[1]
        subjects: set[EntityKey] = set()
        while True:
            entries: Any = await self.redis.xrange(stream, min=start, max="+", count=STREAM_PAGE)
            for entry_id, fields in entries:
                kind, _, entity_id = str((fields or {}).get("subject", "")).partition("/")
                if kind in KINDS and entity_id:
                    subjects.add((kind, entity_id))
                start = f"({entry_id}"
            if len(entries) < STREAM_PAGE:
                return last_id, subjects

    async def repair(self, drifts: list[Drift]) -> int:
        """Re-emit the newest source state of each drifting entity; return how many were sent."""
        repaired = 0
        for drift in drifts:
            if await self._repair_one(drift):
                repaired += 1
        return repaired

    async def _repair_one(self, drift: Drift) -> bool:
        sources = {side: drift.digests.get(side) for side in (Side.MONOLITH, Side.WRITE_MODEL)}
        source = newest_side(sources, self.authority)
        stored = drift.digests.get(Side.READ_MODEL)
        acted = False
        source_digest = None if source is None else sources[source]
        # The projector skips a state whose version and stored `hash` field match, so a read-model
        # entry edited in place must go before the re-emitted state can replace it.
        unbacked = source_digest is None or (
            stored is not None and stored.version > source_digest.version
        )
        edited = drift.problems.get(Side.READ_MODEL) is Problem.CONFLICTING
        if stored is not None and (unbacked or edited):
            acted = await self._remove_read_model_entry(stored)
        if source is None or source_digest is None:
            return acted
        stream, origin = (
            (CDC_STREAM, ORIGIN_MONOLITH) if source is Side.MONOLITH else (CQRS_STREAM, ORIGIN_CQRS)
        )
        event = Event.for_aggregate(
            source=EVENT_SOURCE, aggregate=drift.kind, aggregate_id=drift.id,
            action=REPAIR_ACTION, state=source_digest.state, origin=origin,
        )
        entry_id = await append(self.redis, stream, event)
        log.info(
            "newest state re-emitted",
            extra={"kind": drift.kind, "entity_id": drift.id, "version": source_digest.version,
                   "source_side": source.value, "stream": stream, "entry_id": entry_id,
                   "event_id": event.id,
                   "lagging": {side.value: problem.value
                               for side, problem in drift.problems.items()}},
        )
        return True

    async def _remove_read_model_entry(self, stored: Digest) -> bool:
        """Delete a read-model entry that no source backs, if it still has the version read."""
        if stored.kind == ORDER:
            index_key, command = user_orders_key(str(stored.state.get("user_id", ""))), "ZREM"
        else:
            index_key, command = products_index_key(), "SREM"
        key = _state_key(stored.kind, stored.id)
        removed = bool(
            await self.redis.eval(
                _REMOVE_IF_VERSION_LUA, 2, key, index_key, str(stored.version), stored.id, command
            )
        )
        log.info(
            "read-model entry without a source removed" if removed
            else "read-model entry changed meanwhile; left in place",
            extra={"kind": stored.kind, "entity_id": stored.id, "version": stored.version},
        )
        return removed


@asynccontextmanager
async def open_internal_api(settings: ReconcileSettings) -> AsyncIterator[InternalApi]:
    """Open the internal API client with the CQRS sync client's credentials.

    Raises ValueError naming CQRS_SYNC_CLIENT_SECRET when the secret is missing or refused.
    """
    secret = settings.require_sync_client_secret()
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_SECONDS) as http:
        tokens = ServiceTokenClient(
            http, token_url=settings.token_url, client_id=settings.sync_client_id,
            client_secret=secret,
        )
        yield InternalApi(
            http, tokens, monolith_url=settings.monolith_url, cqrs_url=settings.service_url
        )


@asynccontextmanager
async def open_reconciler(settings: ReconcileSettings) -> AsyncIterator[Reconciler]:
    """Open a reconciler on the services and the Redis that `settings` name."""
    client = connect(settings.redis_url)
    try:
        async with open_internal_api(settings) as api:
            yield Reconciler(
                api, client, authority=settings.phase.authority,
                wait_seconds=settings.reconcile_wait_seconds,
                poll_seconds=settings.reconcile_poll_seconds,
            )
    finally:
        await client.aclose()


# Deletes an entity's hash and its index membership only if the hash still has version ARGV[1],
# so a newer state that the projector wrote after the reconciler read it is kept.
_REMOVE_IF_VERSION_LUA = """
if redis.call('HGET', KEYS[1], 'version') == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call(ARGV[3], KEYS[2], ARGV[2])
    return 1
end
return 0
"""
