"""Delivery end to end: real redis-server, real ``twistd -n relayd``, real Twisted upstream.

test-case-name: tests.test_deliver_integration
"""

from __future__ import annotations

import json
import time
import unittest

from tests.deliver_fixtures import RedisServer, UpstreamProcess, deliver_toml, envelope, start_relayd, wait_for

WAIT = 30.0


class DeliverBasics(unittest.TestCase):
    """Outcomes, headers, dead letters, admin."""

    def setUp(self) -> None:
        self.redis = RedisServer(self)
        self.upstream = UpstreamProcess(self)

    def test_every_message_reaches_2xx_or_dead_letters(self) -> None:
        """200, 500-then-200, 429-then-200, 400, slow body, garbage, closing keep-alives: each ends right."""
        behaviours = ["ok", "fail-once", "retry-after", "bad", "slow-once", "garbage-once", "close", "close", "ok"]
        for i, b in enumerate(behaviours):
            self.redis.command("LPUSH", "leads", envelope(f"m{i}", {"b": b, "i": i}))
        relayd = start_relayd(
            self,
            self.redis,
            deliver_toml(
                name="crm", list="leads", url=self.upstream.url, timeout="1s", backoff="100ms",
                backoff_max="500ms", concurrency=4, headers={"Authorization": "Bearer x"},
            ),
        )
        expected_ok = {f"m{i}" for i, b in enumerate(behaviours) if b != "bad"}
        wait_for(lambda: expected_ok <= self.upstream.delivered_ids(), WAIT, "every good message delivered")
        wait_for(lambda: self.redis.llen("leads:dead") == 1, WAIT, "the 400 dead-lettered")
        dead = json.loads(self.redis.items("leads:dead")[0])
        self.assertEqual(dead["message"]["id"], "m3")
        self.assertEqual(dead["error"]["status"], 400)
        self.assertEqual(dead["error"]["attempts"], 1)
        self.assertLessEqual(dead["error"]["first_ts"], dead["error"]["last_ts"])
        self.assertIn("400", dead["error"]["detail"])
        # Nothing left anywhere in Redis but the dead letter.
        def leftovers() -> list:
            keys = self.redis.command("KEYS", "*")
            return [k for k in keys if b":processing:" in k or b":retry:" in k or k == b"leads"]

        wait_for(lambda: not leftovers(), WAIT, "processing lists and retry set emptied")
        retry = [r for r in self.upstream.requests() if r["headers"]["idempotency-key"] == "m2"]
        self.assertEqual([r["status"] for r in retry], [429, 200])
        self.assertGreaterEqual(retry[1]["t"] - retry[0]["t"], 0.9, "Retry-After: 1 honoured")
        first = self.upstream.requests()[0]
        self.assertEqual(first["headers"]["authorization"], "Bearer x")
        self.assertEqual(first["headers"]["content-type"], "application/json")
        self.assertEqual(json.loads(first["body"]), {"b": "ok", "i": 0})
        status, _, body = relayd.get_admin("/deliver")
        self.assertEqual(status, 200)
        info = json.loads(body)["crm"]
        self.assertEqual((info["queued"], info["in_flight"], info["waiting_for_retry"], info["dead"]), (0, 0, 0, 1))
        self.assertEqual(info["state"], "closed")
