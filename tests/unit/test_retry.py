"""Retry policy: exponential backoff with a cap, and jitter within its documented bounds."""

from __future__ import annotations

import random

import pytest

from consumer_groups.queue.retry import RetryPolicy


def test_exponential_backoff_is_capped():
    p = RetryPolicy(initial_delay_ms=100, multiplier=2.0, max_delay_ms=1000, jitter="none")
    assert [p.delay_ms(n, random.Random(0)) for n in range(1, 7)] == [100, 200, 400, 800, 1000, 1000]
    assert p.ceiling_ms(10_000) == 1000  # no overflow for huge counts


def test_immediate_and_fixed_delays_are_expressible():
    assert RetryPolicy(initial_delay_ms=0, jitter="none").delay_ms(3, random.Random(0)) == 0
    fixed = RetryPolicy(initial_delay_ms=250, multiplier=1.0, max_delay_ms=60_000, jitter="none")
    assert {fixed.delay_ms(n, random.Random(0)) for n in range(1, 9)} == {250}


@pytest.mark.parametrize("jitter, low_fraction", [("full", 0.0), ("equal", 0.5)])
def test_jitter_stays_within_its_bounds_and_spreads(jitter, low_fraction):
    p = RetryPolicy(initial_delay_ms=1000, multiplier=2.0, max_delay_ms=60_000, jitter=jitter)
    rng = random.Random(42)
    delays = [p.delay_ms(3, rng) for _ in range(2000)]
    assert min(delays) >= 4000 * low_fraction and max(delays) <= 4000
    assert len(set(delays)) > 500  # really random


def test_bad_policies_are_refused():
    for kwargs in ({"multiplier": 0.5}, {"jitter": "wild"}, {"initial_delay_ms": -1}):
        with pytest.raises(ValueError):
            RetryPolicy(**kwargs)
