"""Every Redis stream, consumer group and read-model key the platform uses.

Operators and tests rely on these names; change them only together with the docs.
"""

# Streams. Each relay appends only changes that originated on its own side, so no change is ever
# published back to the side it came from.
CDC_STREAM = "cdc.monolith"
CQRS_STREAM = "events.cqrs"

# Consumer groups. A group is created at stream id 0, so entries appended before the consumer's
# first start are still delivered.
INGEST_GROUP = "cqrs-ingest"
PROJECTOR_GROUP = "cqrs-projector"
REVERSE_SYNC_GROUP = "cqrs-reverse-sync"

# The groups that read each stream. Trimming keeps every entry that one of them has not
# acknowledged, and creates a missing group first, so a consumer that has not started yet still
# receives everything appended before its first start.
STREAM_GROUPS: dict[str, tuple[str, ...]] = {
    CDC_STREAM: (INGEST_GROUP, PROJECTOR_GROUP),
    CQRS_STREAM: (PROJECTOR_GROUP, REVERSE_SYNC_GROUP),
}

# Event origins, carried in the `origin` extension and in change-log rows.
ORIGIN_MONOLITH = "monolith"
ORIGIN_CQRS = "cqrs"

DEAD_LETTER_SUFFIX = ".dlq"


def dead_letter_stream(stream: str) -> str:
    """Return the stream that receives entries of `stream` which kept failing."""
    return f"{stream}{DEAD_LETTER_SUFFIX}"


def failure_counts_key(stream: str, group: str) -> str:
    """Hash of entry id to the number of failed attempts of `group` on that entry of `stream`.

    A field is deleted when its entry is acknowledged or dead-lettered, so the hash contains only
    entries that are still being retried.
    """
    return f"tries:{stream}:{group}"


# Read model. Keys carry a prefix so that a rebuild can fill a new prefix and switch over.
READ_MODEL_PREFIX = "rm"
# A rebuild fills `<staging prefix>:<rebuild id>` and then renames its keys onto the live prefix.
READ_MODEL_STAGING_PREFIX = "rm-staging"
# String key containing the staging prefix of the running rebuild. The projector writes every
# event under both prefixes while it exists.
READ_MODEL_REBUILD_KEY = "rm-rebuild"
# The rebuild renews the key every third of this time. A rebuild that died therefore stops the
# projector's double writes within a minute, and a lease this long survives a pause of the
# rebuild process of some seconds.
READ_MODEL_REBUILD_LEASE_SECONDS = 60


def order_key(order_id: str, prefix: str = READ_MODEL_PREFIX) -> str:
    """Hash with the order's `json`, `version` and `hash` fields."""
    return f"{prefix}:order:{order_id}"


def user_orders_key(user_id: str, prefix: str = READ_MODEL_PREFIX) -> str:
    """Sorted set of a user's order ids, scored by creation time in epoch seconds."""
    return f"{prefix}:user-orders:{user_id}"


def product_key(product_id: str, prefix: str = READ_MODEL_PREFIX) -> str:
    """Hash with the product's `json`, `version` and `hash` fields."""
    return f"{prefix}:product:{product_id}"


def products_index_key(prefix: str = READ_MODEL_PREFIX) -> str:
    """Set of every product id in the read model."""
    return f"{prefix}:products"


def read_model_patterns(prefix: str = READ_MODEL_PREFIX) -> tuple[str, ...]:
    """Return the glob patterns that match every key of the read model under `prefix`."""
    return (
        order_key("*", prefix),
        user_orders_key("*", prefix),
        product_key("*", prefix),
        products_index_key(prefix),
    )


# Apply counters of the read model: a hash per aggregate with one field per applied version.
APPLY_COUNTS_PREFIX = "rm-applies"
# Counters prove that no event was applied twice, which can only happen within the time a
# redelivery takes. Each counter hash expires this long after its entity's last apply, so the
# hashes of entities that no longer change do not accumulate.
APPLY_COUNTS_TTL_SECONDS = 7 * 24 * 3600


def apply_counts_key(aggregate: str, aggregate_id: str) -> str:
    """Hash of version to the number of times the projector applied that version."""
    return f"{APPLY_COUNTS_PREFIX}:{aggregate}:{aggregate_id}"


# Revoked token ids, appended by the auth server and tailed by every service. Entries are trimmed
# once older than the longest token lifetime, because an expired token is rejected anyway.
REVOCATION_STREAM = "auth.revocations"

# Failed sign-in counters of the auth server's throttle, per account and per client address.
LOGIN_FAILURES_PREFIX = "auth:login-failures"

# Hash with the result of the last reconcile run: `finished_at` (epoch seconds), `missing`,
# `stale`, `conflicting`, `drift_entities`, `repaired`, `duration_seconds` and `report` (the run's
# JSON report). Each run replaces it whole; it has no TTL, because an old result is still the
# latest known one and `finished_at` shows its age.
RECONCILE_LAST_KEY = "reconcile:last"

# Per-user replication markers: hashes of user id to a `cdc.monolith` entry id. The CDC relay
# raises `gate:published` in the transaction that appends a user's order change, and the ingest
# and projector groups raise their `gate:applied:<group>` after applying and acknowledging it. A
# user is replicated when every group in GATE_GROUPS has reached the published id.
GATE_PUBLISHED_KEY = "gate:published"
GATE_GROUPS: tuple[str, ...] = (INGEST_GROUP, PROJECTOR_GROUP)


def gate_applied_key(group: str) -> str:
    """Hash of user id to the newest `cdc.monolith` entry id of that user `group` applied."""
    return f"gate:applied:{group}"


# Hash the relays report their lag into, at most once a second: field `<relay>` holds the age in
# seconds of the oldest row not yet relayed (0 when caught up), `<relay>:at` the epoch seconds of
# the report.
RELAY_LAG_KEY = "relay:lag"
CDC_RELAY_NAME = "cdc-relay"
OUTBOX_RELAY_NAME = "outbox-relay"

# The gray router's guard. The hash exists only while the guard is tripped, with fields
# `threshold`, `value`, `limit`, `tripped_at` (epoch seconds) and `router` (host:pid). Every router
# process reads it, so one trip diverts CQRS traffic on every replica.
GRAY_GUARD_KEY = "gray:guard"
# Requests each router served per target, in hashes of target to count, one per 10-second bucket.
# The status page shows the last 10 minutes, and a bucket expires a minute after that window so a
# late flush from a slow router process still lands in a live hash.
GRAY_SPLIT_BUCKET_SECONDS = 10
GRAY_SPLIT_BUCKET_TTL_SECONDS = 11 * 60


def gray_split_key(bucket_start: int) -> str:
    """Hash of target to requests served in the 10-second bucket starting at `bucket_start`."""
    return f"gray:split:{bucket_start}"
