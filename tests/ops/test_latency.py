"""The time-to-deliver histogram and its percentiles (pure)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from app.ops.stats.latency import LATENCY_BOUNDS_MS, SLOTS, latency_slot, one_hot, percentile


def test_bounds_grow_by_half_from_ten_ms() -> None:
    assert LATENCY_BOUNDS_MS[:4] == (10, 15, 23, 34)
    assert LATENCY_BOUNDS_MS[-1] > 100 * 60 * 1000
    assert len(LATENCY_BOUNDS_MS) + 1 == SLOTS


def test_upper_bounds_are_inclusive() -> None:
    assert latency_slot(0) == 0
    assert latency_slot(10) == 0
    assert latency_slot(11) == 1
    assert latency_slot(10**9) == SLOTS - 1
    assert one_hot(None) == [0] * SLOTS


def test_empty_histogram_has_no_percentile() -> None:
    assert percentile([0] * SLOTS, 0.5) is None


def test_percentiles_interpolate_inside_the_bucket() -> None:
    hist = [0] * SLOTS
    hist[latency_slot(200)] = 100  # all in the (171, 256] bucket
    assert percentile(hist, 0.5) == 171 + (256 - 171) * 0.5
    assert percentile(hist, 1.0) == 256


@given(st.lists(st.integers(min_value=0, max_value=10_000_000), min_size=1, max_size=200))
def test_percentiles_stay_in_the_bucket_of_the_true_value(samples: list[int]) -> None:
    hist = [0] * SLOTS
    for sample in samples:
        hist[latency_slot(sample)] += 1
    for q in (0.5, 0.95):
        # Nearest rank: the ceil(q·n)-th smallest sample.
        true_value = sorted(samples)[max(1, math.ceil(q * len(samples))) - 1]
        estimate = percentile(hist, q)
        assert estimate is not None
        slot = latency_slot(true_value)
        lower = LATENCY_BOUNDS_MS[slot - 1] if slot else 0
        upper = LATENCY_BOUNDS_MS[slot] if slot < len(LATENCY_BOUNDS_MS) else lower
        assert lower <= estimate <= upper
