"""Timestamps in the one format both sides write, so equal states hash equally."""

from datetime import UTC, datetime


def utc_now() -> str:
    """Return the current UTC time as ISO 8601 with microseconds and a `Z` suffix."""
    return format_timestamp(datetime.now(UTC))


def format_timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_epoch(seconds: float) -> str:
    """Format a Unix time in seconds like `format_timestamp`."""
    return format_timestamp(datetime.fromtimestamp(seconds, UTC))


def parse_timestamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
