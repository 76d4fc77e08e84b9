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

# Event origins, carried in the `origin` extension and in change-log rows.
ORIGIN_MONOLITH = "monolith"
ORIGIN_CQRS = "cqrs"


def dead_letter_stream(stream: str) -> str:
    """Return the stream that receives entries of `stream` which kept failing."""
    return f"{stream}.dlq"


# Read model. Keys carry a prefix so that a rebuild can fill a new prefix and switch over.
READ_MODEL_PREFIX = "rm"


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
