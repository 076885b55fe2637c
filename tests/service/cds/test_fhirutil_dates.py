"""FHIR date parsing: partial dates, offsets, garbage; the memo keeps only short strings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from service.cds import fhirutil
from service.cds.fhirutil import parse_datetime


def test_partial_dates_offsets_and_garbage() -> None:
    assert parse_datetime("2024") == datetime(2024, 1, 1, tzinfo=UTC)
    assert parse_datetime("2024-03") == datetime(2024, 3, 1, tzinfo=UTC)
    assert parse_datetime("2024-03-05") == datetime(2024, 3, 5, tzinfo=UTC)
    assert parse_datetime("2024-03-05T10:00:00+02:00") == datetime(2024, 3, 5, 8, tzinfo=UTC)
    assert parse_datetime("2024-03-05T10:00:00Z") == datetime(2024, 3, 5, 10, tzinfo=UTC)
    for bad in ("", "2024-13", "yesterday", None, 20240305, "2024-03-05T10:00:00Z" * 1000):
        assert parse_datetime(bad) is None


def test_long_strings_are_not_memoised() -> None:
    before = fhirutil._parse_datetime_text.cache_info().currsize
    for i in range(50):
        assert parse_datetime(f"2024-03-05T10:00:00Z{'x' * 100}{i}") is None
    assert fhirutil._parse_datetime_text.cache_info().currsize == before


@settings(max_examples=200, deadline=None)
@given(
    moment=st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1)),
    offset_minutes=st.integers(-14 * 60, 14 * 60),
)
def test_round_trips_any_instant_to_utc(moment: datetime, offset_minutes: int) -> None:
    aware = moment.replace(tzinfo=timezone(timedelta(minutes=offset_minutes)))
    text = aware.isoformat()
    assert parse_datetime(text) == aware.astimezone(UTC)


@given(
    moment=st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2100, 1, 1)),
    offset_minutes=st.integers(min_value=-14 * 60, max_value=14 * 60),
)
def test_iso_is_the_utc_instant_however_the_same_instant_was_written(moment: datetime, offset_minutes: int) -> None:
    aware = moment.replace(tzinfo=timezone(timedelta(minutes=offset_minutes)))
    expected = aware.astimezone(UTC).isoformat().replace("+00:00", "Z")
    assert fhirutil.iso(aware) == expected
    # The memo holds equal instants as one key: the same instant written in UTC must give the same text.
    assert fhirutil.iso(aware.astimezone(UTC)) == expected
