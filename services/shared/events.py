"""The CloudEvents 1.0 envelope every stream entry carries.

An entry's Redis fields are the CloudEvents attributes as strings, `data` as JSON, and the
extensions `aggregateversion` (the aggregate's version after the write) and `origin` (the side that
made the write), plus `traceparent` when the write had one. `data` is always the aggregate's full
state after the write, or its last state for a deletion, so receivers never need earlier events.
"""

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .clock import utc_now

SPEC_VERSION = "1.0"
TYPE_PREFIX = "ztcqrs"
DELETED = "deleted"


class EnvelopeError(ValueError):
    """A stream entry is not a valid event envelope."""


@dataclass(frozen=True)
class Event:
    source: str
    type: str
    subject: str
    data: dict[str, Any]
    aggregate_version: int
    origin: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time: str = field(default_factory=utc_now)
    traceparent: str | None = None

    @classmethod
    def for_aggregate(
        cls,
        *,
        source: str,
        aggregate: str,
        aggregate_id: str,
        action: str,
        state: dict[str, Any],
        origin: str,
        traceparent: str | None = None,
    ) -> "Event":
        """Build the event for `action` on one aggregate, typed `ztcqrs.<aggregate>.<action>`."""
        return cls(
            source=source,
            type=f"{TYPE_PREFIX}.{aggregate}.{action}",
            subject=f"{aggregate}/{aggregate_id}",
            data=state,
            aggregate_version=int(state["version"]),
            origin=origin,
            traceparent=traceparent,
        )

    @property
    def aggregate(self) -> str:
        """Aggregate kind from the subject: `order`, `product` or `user`."""
        return self.subject.split("/", 1)[0]

    @property
    def aggregate_id(self) -> str:
        return self.subject.split("/", 1)[1]

    @property
    def deleted(self) -> bool:
        return self.type.rsplit(".", 1)[-1] == DELETED

    def to_fields(self) -> dict[str, str]:
        fields = {
            "specversion": SPEC_VERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "time": self.time,
            "datacontenttype": "application/json",
            "data": json.dumps(self.data, separators=(",", ":"), sort_keys=True),
            "aggregateversion": str(self.aggregate_version),
            "origin": self.origin,
        }
        if self.traceparent:
            fields["traceparent"] = self.traceparent
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, str] | Mapping[bytes, bytes]) -> "Event":
        """Parse a stream entry, raising `EnvelopeError` naming the first bad attribute."""
        text = {
            (key.decode() if isinstance(key, bytes) else key): (
                value.decode() if isinstance(value, bytes) else value
            )
            for key, value in fields.items()
        }
        for name in (
            "specversion",
            "id",
            "source",
            "type",
            "subject",
            "data",
            "aggregateversion",
            "origin",
        ):
            if not text.get(name):
                raise EnvelopeError(f"Event attribute {name!r} is missing or empty.")
        if text["specversion"] != SPEC_VERSION:
            raise EnvelopeError(f"Event specversion {text['specversion']!r} is not {SPEC_VERSION}.")
        if "/" not in text["subject"]:
            raise EnvelopeError(f"Event subject {text['subject']!r} is not '<aggregate>/<id>'.")
        try:
            data = json.loads(text["data"])
            version = int(text["aggregateversion"])
        except ValueError as error:
            raise EnvelopeError(
                f"Event {text['id']} has invalid data or version: {error}"
            ) from error
        if not isinstance(data, dict):
            raise EnvelopeError(f"Event {text['id']} data is not a JSON object.")
        return cls(
            id=text["id"],
            source=text["source"],
            type=text["type"],
            subject=text["subject"],
            time=text.get("time", ""),
            data=data,
            aggregate_version=version,
            origin=text["origin"],
            traceparent=text.get("traceparent"),
        )
