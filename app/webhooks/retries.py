"""When a failed delivery is tried again, and when an endpoint is given up on (pure)."""

from __future__ import annotations

from datetime import datetime, timedelta

# Delay before each attempt of one schedule: the first is immediate.
RETRY_SCHEDULE = (
    timedelta(0),
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)
JITTER = 0.1
DISABLE_AFTER = timedelta(days=5)


def next_retry_delay(attempts_in_schedule: int, rand: float) -> timedelta | None:
    """Delay before the next attempt after `attempts_in_schedule` failures; None: give up.

    `rand` in [0, 1) spreads retries by ±10% so a recovering receiver is not hit by a herd.
    """
    if attempts_in_schedule >= len(RETRY_SCHEDULE):
        return None
    base = RETRY_SCHEDULE[attempts_in_schedule]
    return base * (1 - JITTER + 2 * JITTER * rand)


def should_disable(failing_since: datetime | None, now: datetime) -> bool:
    return failing_since is not None and now - failing_since >= DISABLE_AFTER
