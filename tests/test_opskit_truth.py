"""The kit tells the truth: every metric the rules and the dashboard name exists in a running relayd.

test-case-name: tests.test_opskit_truth

A real ``twistd -n relayd`` with two workers (so the supervisor's merged
/metrics and its per-worker series are there) and every feature this
branch has configured (schema validation, bearer tokens, a rate limit, an
``accepted`` route with ``format = "body"``), against a real redis-server.
After some traffic, its /metrics must offer every ``relayd_*`` name used by
etc/prometheus/relayd.rules.yml and etc/grafana/relayd.json; ``relayd:*``
names must be recorded by the rules.  A renamed metric fails this test,
naming the metric and where it is used.
"""

from __future__ import annotations

import json
import unittest
from typing import Dict, List, Tuple

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import RedisServer, RelaydProcess, wait_for
from tests.opskit_tools import exposed_names, kit_names, metric_names, missing_names, recorded_names

LEAD_SCHEMA = {
    "type": "object",
    "properties": {"message": {"type": "string"}, "shop": {"type": "string", "minLength": 1}},
    "required": ["message", "shop"],
}
TOKEN = "opskit-token"


class MetricNamesTests(unittest.TestCase):
    """The PromQL name extraction the cross-check relies on (no relayd needed)."""

    def test_extracts_metrics_not_functions_labels_or_keywords(self) -> None:
        """Functions, label names, grouping labels, durations and strings are not metric names."""
        expr = (
            'histogram_quantile(0.99, sum by (job, le) (rate(relayd_a_bucket{route="x_y",le!="1"}[5m]) '
            'and on (job, route) relayd_b{ack="stored"})) > 0.1 or relayd:c:rate5m offset 5m unless up'
        )
        self.assertEqual(metric_names(expr), {"relayd_a_bucket", "relayd_b", "relayd:c:rate5m", "up"})

    def test_missing_names_are_reported_with_their_users(self) -> None:
        """A used name that is not exposed is reported with where it is used; Prometheus' ``up`` is fine."""
        used = {"relayd_x_total": {"rule A"}, "up": {"rule B"}, "relayd:y:rate5m": {"dashboard"}}
        self.assertEqual(
            missing_names(used, exposed={"relayd_z_total"}, recorded={"relayd:y:rate5m"}),
            ["relayd_x_total (used by rule A)"],
        )


class KitAgainstRunningRelaydTests(unittest.TestCase):
    """Scrape a live relayd (2 workers, every feature configured) and hold the kit against it."""

    def setUp(self) -> None:
        self.redis = RedisServer(self)  # started (and waited for) by the constructor
        self.relayd = RelaydProcess(
            self,
            routes=[
                {
                    "path": "/leads",
                    "list": "leads",
                    "schema": "schemas/lead.json",
                    "auth_tokens_file": "tokens",
                    "rate_limit": "1000/s",
                    "rate_burst": 2000,
                },
                {"path": "/fast", "list": "fast", "ack": "accepted", "format": "body"},
                {"path": "/quote", "list": "quotes", "reply_timeout": "1s"},
                {"path": "/tracking/{team}", "stream": "tracking:{team}"},
            ],
            redis_url=self.redis.url,
            server={"workers": 2},
            # A deliver to an upstream nobody listens on: its series exist (and count failures).
            extra_toml=(
                '\n[[deliver]]\nname = "crm"\nlist = "quotes-done"\nurl = "http://127.0.0.1:9/api"\n'
                '\n[[counter]]\nname = "hits"\nlist = "increments"\nkey = "/key"\nvalue = "/value"\nhash = "counts:hits"\n'
            ),
            files={"schemas/lead.json": LEAD_SCHEMA, "tokens": TOKEN + "\n"},
        )
        auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        body = json.dumps({"message": "hi", "shop": "s1"}).encode()
        for _ in range(4):
            self.assertEqual(self.relayd.post("/leads", body, auth)[0], 200)
            self.assertEqual(self.relayd.post("/fast", b"raw bytes", {"Content-Type": "text/plain"})[0], 200)
        self.assertEqual(self.relayd.post("/leads", b"{}", auth)[0], 400)  # schema
        self.assertEqual(self.relayd.post("/nowhere", b"{}")[0], 404)
        wait_for(lambda: self.redis.llen("leads") >= 4, 30, "stored messages in Redis")

    def scrape(self) -> str:
        """The supervisor's merged /metrics."""
        status, _, body = self.relayd.get_admin("/metrics")
        self.assertEqual(status, 200)
        return body.decode("utf-8")

    def samples(self) -> Dict[str, List[Tuple[Dict[str, str], float]]]:
        """``{sample name: [(labels, value)]}`` of a fresh scrape."""
        out: Dict[str, List[Tuple[Dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(self.scrape()):
            for s in family.samples:
                out.setdefault(s.name, []).append((dict(s.labels), s.value))
        return out

    def test_every_name_in_the_kit_is_exposed(self) -> None:
        """Every metric in the rules and the dashboard is in /metrics (or recorded by the rules).

        Also: the series added for the kit merge sensibly over 2 workers
        (route info 1 per route, not 2; ready 1; the reactor lag measured).
        """
        wait_for(
            lambda: self.samples().get("relayd_reactor_lag_seconds_count", [({}, 0.0)])[0][1] > 0,
            30,
            "merged worker metrics with reactor lag samples",
        )
        used = kit_names()
        self.assertGreater(len([n for n in used if n.startswith("relayd_")]), 20)
        missing = missing_names(used, exposed_names(self.scrape()), recorded_names())
        self.assertEqual(missing, [], "names in etc/prometheus or etc/grafana that relayd does not expose")

        s = self.samples()
        info = {(labels["route"], labels["ack"], labels["list"]): value for labels, value in s["relayd_route_info"]}
        self.assertEqual(
            info,
            {
                ("/leads", "stored", "leads"): 1.0,
                ("/fast", "accepted", "fast"): 1.0,
                ("/quote", "stored", "quotes"): 1.0,
                ("/tracking/{team}", "stored", ""): 1.0,  # a stream route without a list
            },
        )
        self.assertEqual(s["relayd_ready"], [({}, 1.0)])
        self.assertEqual([v for _, v in s["relayd_worker_up"]], [1.0, 1.0])
        self.assertGreater(s["relayd_spool_max_bytes"][0][1], 0)
