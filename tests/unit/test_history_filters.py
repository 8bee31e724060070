"""The dashboard's History filters, read from the page's address."""

from datetime import UTC, datetime

from multidict import MultiDict

from service.web.dashboard.history import _parse


def test_a_time_with_an_offset_is_converted_to_utc_not_relabelled():
    """The form's fields are UTC; a time typed into the address with its offset means that
    moment, not the same clock reading in UTC."""
    filters, problems = _parse(
        MultiDict(since="2026-12-05T10:00+02:00", until="2026-12-05T10:00"), {}
    )
    assert problems == []
    assert filters.since == datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
    assert filters.until == datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
