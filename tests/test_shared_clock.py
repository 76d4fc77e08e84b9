"""The one timestamp format both sides write and read."""

from datetime import UTC, datetime

import pytest

from services.shared.clock import format_epoch, format_timestamp, parse_timestamp, utc_now


def test_round_trip() -> None:
    moment = datetime(2026, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)
    text = format_timestamp(moment)
    assert text == "2026-01-31T12:00:00.123456Z"
    assert parse_timestamp(text) == moment
    assert parse_timestamp(text).tzinfo is not None
    assert format_timestamp(parse_timestamp(utc_now())).endswith("Z")
    assert parse_timestamp(format_epoch(1_700_000_000.5)).timestamp() == 1_700_000_000.5


@pytest.mark.parametrize(
    "text",
    [
        "2026-01-31 12:00:00.123456Z",
        "2026-01-31T12:00:00Z",
        "2026-01-31T12:00:00.123456+00:00",
        "2026-01-31T12:00:00.123456",
        "2026-13-31T12:00:00.123456Z",
        "2026-01-31T12:00:00.123456Z\n",
        "",
    ],
)
def test_other_formats_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="is not a UTC timestamp"):
        parse_timestamp(text)
