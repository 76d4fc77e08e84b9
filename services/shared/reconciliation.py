"""How the reconciler compares one entity across the monolith, the CQRS write model and the read
model, and how a run's result is stored in Redis and exported as metrics.

Each side describes an entity by a `Digest`: its version and the `content_hash` of its canonical
state. The side with the highest version has the newest state. Among sides at that version with
different hashes, the phase's authority wins: the monolith when it is `monolith`, the write model
when it is `cqrs`. The read model is a projection, so it is the newest side only when neither source
holds that version. Every other side lags, with one problem:

- `missing`: the side has no such entity;
- `stale`: the side holds a lower version;
- `conflicting`: the side holds the same version with other content.

An entity counts once, under the worst problem of its lagging sides (missing, then stale, then
conflicting).
"""

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Select, Table, select

from .consistency import content_hash
from .names import ORIGIN_CQRS, RECONCILE_LAST_KEY
from .web import add_metrics_refresher

log = logging.getLogger(__name__)

ORDER = "order"
PRODUCT = "product"
KINDS = (ORDER, PRODUCT)


class Side(StrEnum):
    MONOLITH = "monolith"
    WRITE_MODEL = "write_model"
    READ_MODEL = "read_model"


class Problem(StrEnum):
    MISSING = "missing"
    STALE = "stale"
    CONFLICTING = "conflicting"


# Worst first: an entity with several lagging sides is counted under the first that applies.
PROBLEM_SEVERITY = (Problem.MISSING, Problem.STALE, Problem.CONFLICTING)


@dataclass(frozen=True)
class Digest:
    """One side's view of an entity: its version, content hash and canonical state."""

    kind: str
    id: str
    version: int
    hash: str
    state: dict[str, Any]

    @classmethod
    def of(cls, kind: str, state: Mapping[str, Any]) -> "Digest":
        return cls(kind=kind, id=str(state["id"]), version=int(state["version"]),
                   hash=content_hash(state), state=dict(state))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "version": self.version, "hash": self.hash,
                "state": self.state}

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> "Digest":
        return cls(kind=str(item["kind"]), id=str(item["id"]), version=int(item["version"]),
                   hash=str(item["hash"]), state=dict(item["state"]))


EntityKey = tuple[str, str]  # (kind, id)
Observation = dict[Side, Digest | None]


@dataclass(frozen=True)
class Drift:
    """An entity on which the sides disagree."""

    kind: str
    id: str
    newest: Side  # the side whose state the others should reach
    problems: dict[Side, Problem]  # each lagging side and its problem
    digests: Observation

    @property
    def key(self) -> EntityKey:
        return (self.kind, self.id)

    @property
    def problem(self) -> Problem:
        return next(problem for problem in PROBLEM_SEVERITY if problem in self.problems.values())

    @property
    def fingerprint(self) -> tuple[tuple[int, str] | None, ...]:
        """The (version, hash) of each side, to tell whether two reads saw the same drift."""
        return tuple(
            None if digest is None else (digest.version, digest.hash)
            for digest in (self.digests.get(side) for side in Side)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.id,
            "problem": self.problem.value,
            "side": [side.value for side in self.problems],
            "problems": {side.value: problem.value for side, problem in self.problems.items()},
            "newest": self.newest.value,
            "versions": {side.value: _field(self.digests.get(side), "version") for side in Side},
            "hashes": {side.value: _field(self.digests.get(side), "hash") for side in Side},
        }


def _field(digest: Digest | None, name: str) -> Any:
    return None if digest is None else getattr(digest, name)


def newest_side(observation: Observation, authority: str) -> Side | None:
    """Return the side with the newest state, or None when no side holds the entity."""
    present = {side: digest for side, digest in observation.items() if digest is not None}
    if not present:
        return None
    top = max(digest.version for digest in present.values())
    # Sources come first, the authority's source before the other one.
    sources = (
        (Side.WRITE_MODEL, Side.MONOLITH) if authority == ORIGIN_CQRS
        else (Side.MONOLITH, Side.WRITE_MODEL)
    )
    for side in (*sources, Side.READ_MODEL):
        digest = present.get(side)
        if digest is not None and digest.version == top:
            return side
    raise AssertionError("the maximum version belongs to some side")


def compare(kind: str, entity_id: str, observation: Observation, authority: str) -> Drift | None:
    """Return the drift of one entity, or None when every side holds the same state."""
    newest = newest_side(observation, authority)
    if newest is None:
        return None
    reference = observation[newest]
    assert reference is not None
    problems: dict[Side, Problem] = {}
    for side in Side:
        digest = observation.get(side)
        if digest is None:
            problems[side] = Problem.MISSING
        elif digest.version < reference.version:
            problems[side] = Problem.STALE
        elif digest.hash != reference.hash:
            problems[side] = Problem.CONFLICTING
    if not problems:
        return None
    return Drift(kind=kind, id=entity_id, newest=newest, problems=problems,
                 digests=dict(observation))


def compare_all(
    sides: Mapping[Side, Mapping[EntityKey, Digest]], authority: str
) -> dict[EntityKey, Drift]:
    """Compare every entity that any side holds; return the drifting ones by (kind, id)."""
    keys: set[EntityKey] = set()
    for digests in sides.values():
        keys.update(digests)
    drifts: dict[EntityKey, Drift] = {}
    for kind, entity_id in sorted(keys):
        observation = {side: sides.get(side, {}).get((kind, entity_id)) for side in Side}
        drift = compare(kind, entity_id, observation, authority)
        if drift is not None:
            drifts[drift.key] = drift
    return drifts


@dataclass
class Report:
    """The result of one reconcile run, as stored in `reconcile:last` and printed."""

    started_at: float
    authority: str
    drifts: list[Drift] = field(default_factory=list)
    # Entities that still differed when the wait ended but had work in flight; not drift.
    in_flight: list[Drift] = field(default_factory=list)
    as_of: dict[str, Any] = field(default_factory=dict)
    repaired: int = 0
    # Drift found before a repair, when the run repaired.
    before_repair: dict[str, int] | None = None
    finished_at: float = 0.0

    def counts(self) -> dict[str, int]:
        counts = {problem.value: 0 for problem in Problem}
        for drift in self.drifts:
            counts[drift.problem.value] += 1
        return counts

    @property
    def drift_entities(self) -> int:
        return len(self.drifts)

    @property
    def duration_seconds(self) -> float:
        return max(self.finished_at - self.started_at, 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "finished_at": self.finished_at,
            "duration_seconds": round(self.duration_seconds, 3),
            "authority": self.authority,
            **self.counts(),
            "drift_entities": self.drift_entities,
            "repaired": self.repaired,
            "before_repair": self.before_repair,
            "as_of": self.as_of,
            "entities": [drift.to_json() for drift in self.drifts],
            "in_flight": [drift.to_json() for drift in self.in_flight],
        }


# Largest page of digests the internal reconcile routes of either side return.
MAX_DIGEST_PAGE = 1000


def digest_query(table: Table, *, after: str, limit: int, ids: list[str] | None) -> Select[Any]:
    """Select the rows of `ids`, or else up to `limit` rows with an id above `after`, by id."""
    query = select(table).order_by(table.c.id)
    if ids:
        return query.where(table.c.id.in_(ids))
    return query.where(table.c.id > after).limit(limit)


def digest_page(
    kind: str, digests: list[Digest], *, limit: int, ids: list[str] | None
) -> dict[str, Any]:
    """Build a digests response; `next_after` is null on the last page and for a list of ids."""
    full_page = not ids and len(digests) == limit
    return {
        "kind": kind,
        "items": [digest.to_json() for digest in digests],
        "next_after": digests[-1].id if full_page else None,
    }


def list_conflicts(connection: Connection, table: Table, limit: int) -> list[dict[str, Any]]:
    """Return up to `limit` rows of a `conflicts` table, newest first, with both states parsed."""
    query = select(table).order_by(table.c.id.desc()).limit(limit)
    return [
        {
            "id": row["id"],
            "kind": row["aggregate"],
            "entity_id": row["aggregate_id"],
            "version": row["version"],
            "local": json.loads(row["local_json"]),
            "incoming": json.loads(row["incoming_json"]),
            "incoming_origin": row["incoming_origin"],
            "resolution": row["resolution"],
            "recorded_at": row["recorded_at"],
        }
        for row in connection.execute(query).mappings()
    ]


async def store_report(client: "aioredis.Redis", report: Report) -> None:
    """Replace `reconcile:last` with the report's counts and JSON in one step."""
    counts = report.counts()
    fields = {
        "finished_at": repr(report.finished_at),
        "missing": str(counts[Problem.MISSING.value]),
        "stale": str(counts[Problem.STALE.value]),
        "conflicting": str(counts[Problem.CONFLICTING.value]),
        "drift_entities": str(report.drift_entities),
        "repaired": str(report.repaired),
        "report": json.dumps(report.to_json(), sort_keys=True, separators=(",", ":")),
        "duration_seconds": f"{report.duration_seconds:.3f}",
    }
    async with client.pipeline(transaction=True) as pipe:
        pipe.delete(RECONCILE_LAST_KEY)
        pipe.hset(RECONCILE_LAST_KEY, mapping=fields)  # type: ignore[arg-type]
        await pipe.execute()


class ReconcileCollector(Collector):
    """Prometheus gauges of the last reconcile run, from `reconcile:last`.

    `services.shared.migration_health` already exports the drift counts
    (`ztcqrs_reconcile_drift_entities`) and the finish time from the same hash, so this collector
    adds only the repair count and the duration. `refresh` reads the hash before each scrape.
    """

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}

    async def refresh(self, client: "aioredis.Redis") -> None:
        try:
            fields = await client.hgetall(RECONCILE_LAST_KEY)
            self.fields = {str(name): str(value) for name, value in fields.items()}
        except redis.RedisError as error:
            self.fields = {}
            log.warning("reading reconcile:last for metrics failed", extra={"error": repr(error)})

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fields = self.fields
        if not fields:
            return
        yield GaugeMetricFamily(
            "ztcqrs_reconcile_repaired_entities",
            "Entities whose newest state the last reconcile run re-emitted.",
            value=_number(fields.get("repaired")),
        )
        yield GaugeMetricFamily(
            "ztcqrs_reconcile_last_run_duration_seconds",
            "Duration of the last reconcile run, in seconds.",
            value=_number(fields.get("duration_seconds")),
        )


_collector: ReconcileCollector | None = None


def install_reconcile_metrics(app: FastAPI, client: "aioredis.Redis") -> None:
    """Export the last reconcile run's gauges on `app`'s `/metrics`, read through `client`.

    The collector is registered once per process, because the default registry rejects a second
    collector with the same metric names. The caller owns `client`.
    """
    global _collector
    if _collector is None:
        _collector = ReconcileCollector()
        REGISTRY.register(_collector)
    collector = _collector

    async def refresh() -> None:
        await collector.refresh(client)

    add_metrics_refresher(app, refresh)


def _number(text: str | None) -> float:
    try:
        return float(text) if text is not None else 0.0
    except ValueError:
        return 0.0
