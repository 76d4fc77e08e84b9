"""Consumer options the CQRS workers build from their settings."""

from services.shared.streams import ConsumerOptions

from ..settings import Settings


def consumer_options(settings: Settings) -> ConsumerOptions:
    return ConsumerOptions(max_tries=settings.max_tries, claim_idle_ms=settings.claim_idle_ms)
