"""Plain-number hot-path series export exactly what prometheus-client's own would.

test-case-name: tests.test_fastmetrics
"""

from __future__ import annotations

import unittest

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from relayd.ops.fastmetrics import FastCollector, FastCounter, FastHistogram, single

BOUNDS = (0.001, 0.01, 0.1, 1.0)


def _samples(text: bytes) -> list:
    return sorted(line for line in text.decode().splitlines() if line and not line.startswith("#") and "_created" not in line)


class EquivalenceTests(unittest.TestCase):
    """Same observations, same exposition samples (HELP/TYPE aside)."""

    @given(st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), max_size=50), st.integers(0, 1000))
    def test_histogram_and_counter_match_the_library(self, values: list, incs: int) -> None:
        """Bucket counts (le inclusive), sum, count and a counter value agree with prometheus-client's."""
        ref = CollectorRegistry()
        ref_h = Histogram("h", "doc", buckets=BOUNDS, registry=ref)
        ref_c = Counter("c", "doc", ["route"], registry=ref)
        fast = FastHistogram(BOUNDS)
        counter = FastCounter()
        for v in values:
            ref_h.observe(v)
            fast.observe(v)
        ref_c.labels(route="/r").inc(incs)
        counter.inc(incs)
        ours = CollectorRegistry()
        collector = FastCollector()
        collector.histogram("h", "doc", (), single(fast))
        collector.counter("c", "doc", "route", lambda: [("/r", counter)])
        ours.register(collector)
        self.assertEqual(_samples(generate_latest(ours)), _samples(generate_latest(ref)))
