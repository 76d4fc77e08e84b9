"""Consumer options the CQRS workers build from their settings."""

from services.shared.streams import ConsumerOptions

from ..settings import Settings


def consumer_options(settings: Settings) -> ConsumerOptions:
    return ConsumerOptions(
        max_tries=settings.max_tries,
        claim_idle_ms=settings.claim_idle_ms,
        retry_base_seconds=settings.retry_base_seconds,
        retry_max_seconds=settings.retry_max_seconds,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
    )
