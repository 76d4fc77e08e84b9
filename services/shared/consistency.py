"""The one rule every receiver uses to decide whether an incoming state replaces the one it holds.

States carry versions that every write increments. A newer version replaces an older one, so
duplicates and reordering are harmless. Equal versions with different contents are a conflict,
resolved in favour of the migration phase's authority.
"""

import hashlib
import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

# Fields that describe where a state travelled, not what it is.
_NON_CONTENT_FIELDS = frozenset({"origin"})


class Decision(StrEnum):
    APPLY = "apply"
    STALE = "stale"  # an older version: skip
    DUPLICATE = "duplicate"  # the same version and content: skip
    CONFLICT_APPLY = "conflict_apply"  # same version, other content, incoming side is authority
    CONFLICT_KEEP = "conflict_keep"  # same version, other content, local state is kept

    @property
    def applies(self) -> bool:
        return self in (Decision.APPLY, Decision.CONFLICT_APPLY)

    @property
    def conflict(self) -> bool:
        return self in (Decision.CONFLICT_APPLY, Decision.CONFLICT_KEEP)


def content_hash(state: Mapping[str, Any]) -> str:
    """Return a SHA-256 over the state's canonical JSON, ignoring travel metadata."""
    content = {key: value for key, value in state.items() if key not in _NON_CONTENT_FIELDS}
    encoded = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


def decide(
    *,
    local_version: int | None,
    local_hash: str | None,
    incoming_version: int,
    incoming_hash: str,
    incoming_origin: str,
    authority: str,
) -> Decision:
    """Decide what a receiver holding `local_version` and `local_hash` does with a new state."""
    if local_version is None or incoming_version > local_version:
        return Decision.APPLY
    if incoming_version < local_version:
        return Decision.STALE
    if incoming_hash == local_hash:
        return Decision.DUPLICATE
    return Decision.CONFLICT_APPLY if incoming_origin == authority else Decision.CONFLICT_KEEP
