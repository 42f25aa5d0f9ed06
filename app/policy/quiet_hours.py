"""Quiet hours: when a marketing message may reach its recipient, in the recipient's zone.

Pure functions with the clock passed in, so the window and its edges (midnight, DST
gaps and repeated hours) are tested without waiting for them.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, available_timezones


@lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones())


def is_time_zone(name: str) -> bool:
    """An IANA zone name (`Europe/Warsaw`); never a path or a POSIX TZ string."""
    return name in _zone_names()


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def is_quiet(local: time, start: time, end: time) -> bool:
    """Whether a local wall-clock time is inside [start, end); start > end spans midnight."""
    if start == end:
        return False
    if start < end:
        return start <= local < end
    return local >= start or local < end


def next_allowed(now: datetime, tz: ZoneInfo, start: time, end: time) -> datetime | None:
    """The first instant after `now` outside the quiet window, or None when `now` is outside.

    The window ends when the recipient's wall clock shows `end`. When that wall time does
    not exist that day (a DST gap), the window ends at the transition; when it exists twice
    (clocks set back), at whichever occurrence comes first after `now`.
    """
    local = now.astimezone(tz)
    if not is_quiet(local.time().replace(tzinfo=None), start, end):
        return None
    day = local.date() if local.time().replace(tzinfo=None) < end else local.date() + timedelta(1)
    wall = datetime.combine(day, end, tzinfo=tz)
    candidate = wall.astimezone(UTC)
    if candidate.astimezone(tz).replace(tzinfo=None) != wall.replace(tzinfo=None):
        return _transition_before(candidate, tz)
    if candidate <= now:
        # Clocks were set back and `now` is in the repeated hour: the second `end` counts.
        candidate = wall.replace(fold=1).astimezone(UTC)
    return candidate


def _transition_before(instant: datetime, tz: ZoneInfo) -> datetime:
    """The UTC-offset change at most a day before `instant` (binary search to the second)."""
    after = instant.astimezone(tz).utcoffset()
    lo, hi = instant - timedelta(days=1), instant
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        if mid.astimezone(tz).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    return hi.replace(microsecond=0)  # transitions fall on whole seconds
