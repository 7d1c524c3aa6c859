"""The GC service: thresholds raised and restored, collections timed by generation.

test-case-name: tests.test_gctune
"""

from __future__ import annotations

import gc
import unittest

from twisted.internet.task import Clock

from relayd.ops.gctune import GcService
from relayd.ops.metrics import Metrics


class GcServiceTests(unittest.TestCase):
    """Runs in the test process, so it never freezes (freeze_on_start=False)."""

    def test_thresholds_and_timing(self) -> None:
        """Started: gen0 threshold raised and each collection observed under its generation;
        stopped: thresholds and callbacks as before."""
        before = gc.get_threshold()
        ticks = iter([1.0, 1.25, 2.0, 2.5])
        metrics = Metrics()
        service = GcService(Clock(), metrics, gen0_threshold=12_345, timer=lambda: next(ticks), freeze_on_start=False)
        service.startService()
        try:
            self.assertEqual(gc.get_threshold()[0], 12_345)
            service._on_gc("start", {"generation": 0})
            service._on_gc("stop", {"generation": 0})
            service._on_gc("start", {"generation": 2})
            service._on_gc("stop", {"generation": 2})
        finally:
            service.stopService()
        self.assertEqual(gc.get_threshold(), before)
        self.assertNotIn(service._on_gc, gc.callbacks)
        text = metrics.exposition().decode()
        self.assertIn('relayd_gc_pause_seconds_sum{generation="0"} 0.25', text)
        self.assertIn('relayd_gc_pause_seconds_sum{generation="2"} 0.5', text)

    def test_real_collection_is_observed(self) -> None:
        """A real gc.collect() lands in the generation-2 histogram."""
        metrics = Metrics()
        service = GcService(Clock(), metrics, freeze_on_start=False)
        service.startService()
        try:
            gc.collect()
        finally:
            service.stopService()
        self.assertIn('relayd_gc_pause_seconds_count{generation="2"} 1.0', metrics.exposition().decode())
