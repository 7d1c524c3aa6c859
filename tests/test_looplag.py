"""relayd/ops/looplag.py: the reactor loop-lag monitor, on a `task.Clock`.

test-case-name: tests.test_looplag
"""

from __future__ import annotations

import unittest
from typing import List

from twisted.internet.task import Clock

from relayd.ops.looplag import LAG_INTERVAL, LoopLagMonitor
from relayd.ops.metrics import Metrics


class Recorder:
    """A histogram stand-in that keeps every observation (an injected double, not a patch)."""

    def __init__(self) -> None:
        self.values: List[float] = []

    def observe(self, value: float) -> None:
        """Keep `value`."""
        self.values.append(value)


class LoopLagTests(unittest.TestCase):
    """Lateness of scheduled calls, measured from the injected clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)  # a non-zero start: lag must not depend on t=0
        self.recorder = Recorder()
        self.monitor = LoopLagMonitor(self.clock, self.recorder)
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)

    def test_on_time_runs_observe_zero(self) -> None:
        """A reactor that runs each call when due reports zero lag, once per interval."""
        for _ in range(4):
            self.clock.advance(LAG_INTERVAL)
        self.assertEqual(self.recorder.values, [0.0, 0.0, 0.0, 0.0])

    def test_late_run_observes_the_delay(self) -> None:
        """A call run 0.2 s after it was due observes 0.2 s."""
        self.clock.advance(LAG_INTERVAL + 0.2)
        self.assertEqual(len(self.recorder.values), 1)
        self.assertAlmostEqual(self.recorder.values[0], 0.2, places=9)

    def test_a_stall_over_many_intervals_is_seen_whole(self) -> None:
        """A 5 s stall (ten missed intervals) is one observation of about 5 s, not ten small ones."""
        self.clock.advance(LAG_INTERVAL)  # on time
        self.clock.advance(5.0 + LAG_INTERVAL)  # the reactor was blocked: the next run is 5 s late
        self.assertEqual(len(self.recorder.values), 2)
        self.assertAlmostEqual(self.recorder.values[1], 5.0, places=9)
        # and the loop is back on its grid afterwards
        self.clock.advance(LAG_INTERVAL)
        self.assertAlmostEqual(self.recorder.values[2], 0.0, places=9)

    def test_stop_stops_measuring(self) -> None:
        """After stopService nothing is scheduled and nothing more is observed."""
        self.clock.advance(LAG_INTERVAL)
        result = []
        self.monitor.stopService().addCallback(result.append)
        self.assertEqual(result, [None])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10 * LAG_INTERVAL)
        self.assertEqual(len(self.recorder.values), 1)

    def test_feeds_the_prometheus_histogram(self) -> None:
        """Wired to `Metrics.reactor_lag`, a late run shows in ``relayd_reactor_lag_seconds``."""
        metrics = Metrics()
        monitor = LoopLagMonitor(self.clock, metrics.reactor_lag)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        self.clock.advance(LAG_INTERVAL + 0.3)
        text = metrics.exposition().decode()
        self.assertIn("relayd_reactor_lag_seconds_count 1.0", text)
        self.assertIn('relayd_reactor_lag_seconds_bucket{le="0.25"} 0.0', text)
        self.assertIn('relayd_reactor_lag_seconds_bucket{le="0.5"} 1.0', text)
