"""Quiet hours as a pure function of an injected `now`: midnight, DST gaps and repeats."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

from hypothesis import given
from hypothesis import strategies as st

from app.policy.quiet_hours import is_quiet, is_time_zone, next_allowed, zone

WARSAW = zone("Europe/Warsaw")
NEW_YORK = zone("America/New_York")
NIGHT = (time(21, 0), time(8, 0))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_outside_the_window_sends_now() -> None:
    assert next_allowed(utc(2026, 6, 10, 10, 0), WARSAW, *NIGHT) is None  # 12:00 CEST


def test_evening_is_held_until_the_next_morning() -> None:
    # 23:00 CEST on 10 June → 08:00 CEST on 11 June.
    assert next_allowed(utc(2026, 6, 10, 21, 0), WARSAW, *NIGHT) == utc(2026, 6, 11, 6, 0)


def test_small_hours_are_held_until_the_same_morning() -> None:
    assert next_allowed(utc(2026, 6, 11, 1, 0), WARSAW, *NIGHT) == utc(2026, 6, 11, 6, 0)


def test_the_window_end_itself_is_allowed() -> None:
    assert next_allowed(utc(2026, 6, 11, 6, 0), WARSAW, *NIGHT) is None


def test_the_recipients_zone_decides_not_ours() -> None:
    # 02:00 UTC is 04:00 in Warsaw (quiet) but 22:00 the day before in New York (quiet too,
    # until 08:00 EDT = 12:00 UTC).
    now = utc(2026, 6, 11, 2, 0)
    assert next_allowed(now, WARSAW, *NIGHT) == utc(2026, 6, 11, 6, 0)
    assert next_allowed(now, NEW_YORK, *NIGHT) == utc(2026, 6, 11, 12, 0)


def test_a_night_across_spring_forward_ends_at_local_eight() -> None:
    # 28→29 March 2026 Warsaw moves from +01 to +02: 08:00 is 06:00 UTC, not 07:00.
    assert next_allowed(utc(2026, 3, 28, 22, 0), WARSAW, *NIGHT) == utc(2026, 3, 29, 6, 0)


def test_an_end_inside_the_spring_gap_ends_at_the_transition() -> None:
    # 02:30 does not exist on 29 March in Warsaw: the clocks jump 02:00 → 03:00 (01:00 UTC).
    quiet = (time(1, 0), time(2, 30))
    assert next_allowed(utc(2026, 3, 29, 0, 30), WARSAW, *quiet) == utc(2026, 3, 29, 1, 0)


def test_a_night_across_fall_back_ends_at_local_eight() -> None:
    # 24→25 October 2026 Warsaw goes from +02 to +01: 08:00 is 07:00 UTC.
    assert next_allowed(utc(2026, 10, 24, 21, 0), WARSAW, *NIGHT) == utc(2026, 10, 25, 7, 0)


def test_the_repeated_hour_ends_at_each_occurrence_of_the_end() -> None:
    quiet = (time(0, 0), time(2, 30))
    # 01:00 CEST (first pass) → 02:30 CEST = 00:30 UTC.
    assert next_allowed(utc(2026, 10, 24, 23, 0), WARSAW, *quiet) == utc(2026, 10, 25, 0, 30)
    # 02:10 CET (second pass, after 02:30 CEST came and went) → 02:30 CET = 01:30 UTC.
    assert next_allowed(utc(2026, 10, 25, 1, 10), WARSAW, *quiet) == utc(2026, 10, 25, 1, 30)


def test_new_york_spring_forward() -> None:
    # 8 March 2026: 02:00 EST → 03:00 EDT. A 22:00-08:00 night ends at 12:00 UTC.
    assert next_allowed(utc(2026, 3, 8, 4, 0), NEW_YORK, *NIGHT) == utc(2026, 3, 8, 12, 0)


def test_time_zone_names_are_iana_names_only() -> None:
    assert is_time_zone("Europe/Warsaw")
    assert not is_time_zone("Mars/Olympus")
    assert not is_time_zone("../../etc/passwd")
    assert not is_time_zone("UTC+2")


ZONES = st.sampled_from(
    ["Europe/Warsaw", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "UTC"]
)
WALL = st.times().map(lambda t: t.replace(microsecond=0))
NOW = st.datetimes(
    min_value=datetime(2025, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)
)


@given(NOW, ZONES, WALL, WALL)
def test_the_hold_ends_at_the_first_allowed_moment(
    now: datetime, zone_name: str, start: time, end: time
) -> None:
    tz = zone(zone_name)
    allowed = next_allowed(now, tz, start, end)

    def quiet_at(instant: datetime) -> bool:
        return is_quiet(instant.astimezone(tz).time(), start, end)

    if allowed is None:
        assert not quiet_at(now)
        return
    assert quiet_at(now)
    assert allowed > now
    assert not quiet_at(allowed)
    # Quiet up to the end: never a later moment than needed, never an earlier one.
    assert quiet_at(allowed - timedelta(seconds=1))
    span = allowed - now
    assert all(quiet_at(now + span * i / 16) for i in range(16))
