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
