"""Time-to-deliver as a fixed histogram: cheap to add up, good enough for percentiles.

Bucket upper bounds grow by 1.5x from 10 ms to ~108 minutes, so an interpolated percentile
is within about a quarter of the true value. The bounds are part of the stored data:
changing them needs a migration of `stats_rollups.latency_hist`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

LATENCY_BOUNDS_MS: tuple[int, ...] = tuple(int(10 * 1.5**i + 0.5) for i in range(34))
# One slot per bound plus the overflow slot.
SLOTS = len(LATENCY_BOUNDS_MS) + 1


def latency_slot(latency_ms: int) -> int:
    """The histogram slot holding `latency_ms` (upper bounds are inclusive)."""
    return bisect_left(LATENCY_BOUNDS_MS, max(0, latency_ms))


def one_hot(latency_ms: int | None) -> list[int]:
    """A histogram with one observation, or all zeros for no observation."""
    hist = [0] * SLOTS
    if latency_ms is not None:
        hist[latency_slot(latency_ms)] = 1
    return hist


def add_histograms(into: list[int], other: Sequence[int]) -> None:
    for slot, count in enumerate(other[:SLOTS]):
        into[slot] += count


def percentile(hist: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 < q ≤ 1) in ms, interpolated linearly inside its bucket."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for slot, count in enumerate(hist):
        if count and seen + count >= rank:
            lower = LATENCY_BOUNDS_MS[slot - 1] if slot > 0 else 0
            if slot >= len(LATENCY_BOUNDS_MS):
                return float(lower)  # the overflow bucket has no upper bound
            upper = LATENCY_BOUNDS_MS[slot]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return float(LATENCY_BOUNDS_MS[-1])
