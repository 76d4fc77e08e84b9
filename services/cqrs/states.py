"""Canonical aggregate states, so that equal states from either side hash equally.

Incoming event data is validated against the public schema of its aggregate and dumped back to JSON
types. The result drops travel metadata such as `origin`, and `items` is always a list even when the
sender stored it as JSON text.
"""

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from services.shared.domain import OrderPublic, ProductPublic
from services.shared.events import Event

ORDER = "order"
PRODUCT = "product"
USER = "user"


class UserState(BaseModel):
    id: str
    username: str
    display_name: str | None = None
    version: int
    updated_at: str


SCHEMAS: dict[str, type[BaseModel]] = {ORDER: OrderPublic, PRODUCT: ProductPublic, USER: UserState}


class InvalidState(ValueError):
    """Event data that is not a valid state of its aggregate; retrying cannot fix it."""


def canonical_state(aggregate: str, data: dict[str, Any]) -> dict[str, Any]:
    """Validate `data` as a state of `aggregate` and return it in canonical form.

    Raises InvalidState for an unknown aggregate or a state that does not match its schema.
    """
    schema = SCHEMAS.get(aggregate)
    if schema is None:
        raise InvalidState(
            f"Aggregate {aggregate!r} is unknown; expected one of {', '.join(SCHEMAS)}."
        )
    source = dict(data)
    if aggregate == ORDER and isinstance(source.get("items"), str):
        try:
            source["items"] = json.loads(source["items"])
        except ValueError as error:
            raise InvalidState(
                f"Order {source.get('id')!r} has invalid items JSON: {error}"
            ) from error
    try:
        return schema.model_validate(source).model_dump(mode="json")
    except ValidationError as error:
        raise InvalidState(
            f"The {aggregate} state {source.get('id')!r} is invalid: {error.errors()[0]['msg']} "
            f"at {'.'.join(str(part) for part in error.errors()[0]['loc'])}."
        ) from error


def event_state(event: Event) -> dict[str, Any]:
    """Return the canonical state an event carries, checking it against the event's subject.

    Raises InvalidState when the state's id or version differs from the envelope's.
    """
    state = canonical_state(event.aggregate, event.data)
    if state["id"] != event.aggregate_id:
        raise InvalidState(
            f"Event {event.id} is about {event.subject!r} but its data has id {state['id']!r}."
        )
    if state["version"] != event.aggregate_version:
        raise InvalidState(
            f"Event {event.id} has aggregateversion {event.aggregate_version} but its data has "
            f"version {state['version']}."
        )
    return state
