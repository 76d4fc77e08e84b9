"""Timestamps in the one format both sides write, so equal states hash equally."""

import re
from datetime import UTC, datetime

# `format_timestamp`'s output. It is checked before datetime.fromisoformat, which accepts other
# ISO forms too. The pair costs about a tenth of strptime, and the relays parse one per row.
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def utc_now() -> str:
    """Return the current UTC time as ISO 8601 with microseconds and a `Z` suffix."""
    return format_timestamp(datetime.now(UTC))


def format_timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_epoch(seconds: float) -> str:
    """Format a Unix time in seconds like `format_timestamp`."""
    return format_timestamp(datetime.fromtimestamp(seconds, UTC))


def parse_timestamp(text: str) -> datetime:
    """Parse a timestamp that `format_timestamp` wrote; raise ValueError for any other text."""
    problem = f"{text[:64]!r} is not a UTC timestamp such as 2026-01-31T12:00:00.000000Z"
    if not _TIMESTAMP.fullmatch(text):
        raise ValueError(problem)
    try:
        return datetime.fromisoformat(text)
    except ValueError as error:  # a date or time out of range, such as month 13
        raise ValueError(f"{problem}: {error}") from error
