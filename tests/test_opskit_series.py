"""The series added for the operations kit: route info and how the merge treats them.

test-case-name: tests.test_opskit_series
"""

from __future__ import annotations

import unittest

from relayd.ops.metrics import Metrics
from relayd.ops.metrics_merge import MetricsMerger, parse


class RouteInfoTests(unittest.TestCase):
    """``relayd_route_info`` lists exactly the configured routes."""

    def routes(self, metrics: Metrics) -> set:
        """``{(route, list, ack)}`` with value 1 in an exposition."""
        out = set()
        for name, _, _, samples in parse(metrics.exposition().decode()):
            if name == "relayd_route_info":
                out |= {(labels["route"], labels["list"], labels["ack"]) for _, labels, v in samples if v == 1.0}
        return out

    def test_describe_routes_replaces_the_set(self) -> None:
        """A reload (second call) drops routes that are gone instead of keeping stale series."""
        m = Metrics()
        m.describe_routes([("/a", "a", "stored"), ("/b", "b", "accepted")])
        self.assertEqual(self.routes(m), {("/a", "a", "stored"), ("/b", "b", "accepted")})
        m.describe_routes([("/b", "b", "stored")])
        self.assertEqual(self.routes(m), {("/b", "b", "stored")})


class MergeTests(unittest.TestCase):
    """Over several workers: ready is the minimum, route info is not multiplied, capacities add up."""

    def worker(self, ready: float, max_bytes: float) -> str:
        """One worker's exposition."""
        m = Metrics()
        m.describe_routes([("/a", "a", "stored")])
        m.ready.set(ready)
        m.spool_max_bytes.set(max_bytes)
        return m.exposition().decode()

    def test_merge_rules(self) -> None:
        """Two workers, one not ready: merged ready 0, route info 1, spool max bytes summed."""
        text = MetricsMerger().merge([self.worker(1, 100), self.worker(0, 100)]).decode()
        merged = {(n, tuple(sorted(labels.items()))): v for _, _, _, s in parse(text) for n, labels, v in s}
        self.assertEqual(merged[("relayd_ready", ())], 0.0)
        self.assertEqual(merged[("relayd_route_info", (("ack", "stored"), ("list", "a"), ("route", "/a")))], 1.0)
        self.assertEqual(merged[("relayd_spool_max_bytes", ())], 200.0)
