"""Delivery end to end: real redis-server, real ``twistd -n relayd``, real Twisted upstream.

test-case-name: tests.test_deliver_integration
"""

from __future__ import annotations

import base64
import json
import signal
import time
import unittest

from tests.deliver_fixtures import (
    RedisServer,
    UpstreamProcess,
    admin_request,
    deliver_toml,
    envelope,
    start_relayd,
    wait_for,
)

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
        # (concurrency 4: arrival order at the upstream is not claim order; order is tested with concurrency 1)
        first = next(r for r in self.upstream.requests() if r["headers"]["idempotency-key"] == "m0")
        self.assertEqual(first["headers"]["authorization"], "Bearer x")
        self.assertEqual(first["headers"]["content-type"], "application/json")
        self.assertEqual(json.loads(first["body"]), {"b": "ok", "i": 0})
        status, _, body = relayd.get_admin("/deliver")
        self.assertEqual(status, 200)
        info = json.loads(body)["crm"]
        self.assertEqual((info["queued"], info["in_flight"], info["waiting_for_retry"], info["dead"]), (0, 0, 0, 1))
        self.assertEqual(info["state"], "closed")

    def test_signatures_idempotency_keys_order_and_raw_items(self) -> None:
        """Standard Webhooks signatures verify; first attempts follow list order; non-envelope items go as they are."""
        from standardwebhooks.webhooks import Webhook

        secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
        ids = [f"o{i:02d}" for i in range(20)]
        for mid in ids:
            self.redis.command("LPUSH", "leads", envelope(mid, {"b": "ok", "mid": mid}))
        raw_bytes = b"\xff\xfe not utf-8"
        self.redis.command("LPUSH", "leads", raw_bytes)
        self.redis.command("LPUSH", "leads", b"[1, 2, 3]")
        relayd = start_relayd(
            self,
            self.redis,
            deliver_toml(name="crm", list="leads", url=self.upstream.url, concurrency=1, sign_secret_file="crm.secret"),
            files={"crm.secret": secret + "\n"},
        )
        wait_for(lambda: len(self.upstream.requests()) >= 22, WAIT, "22 requests")
        requests = self.upstream.requests()
        self.assertEqual([r["headers"]["idempotency-key"] for r in requests[:20]], ids, "oldest first, in order")
        hook = Webhook(secret)
        for r in requests:
            headers = {k: v for k, v in r["headers"].items() if k.startswith("webhook-")}
            body = r["body"].encode("latin-1")
            if body != raw_bytes:  # the reference library decodes bodies as UTF-8 first
                hook.verify(body, headers, json_parse=False)  # raises if the signature is wrong
            self.assertEqual(headers["webhook-id"], r["headers"]["idempotency-key"])
        raw = requests[20]
        self.assertEqual(raw["body"].encode("latin-1"), raw_bytes)
        self.assertEqual(raw["headers"]["content-type"], "application/octet-stream")
        self.assertTrue(raw["headers"]["idempotency-key"].startswith("sha256-"))
        self.assertEqual(requests[21]["headers"]["content-type"], "application/json")
        self.assertEqual(requests[21]["body"], "[1, 2, 3]")
        self.assertTrue(relayd.alive())

    def test_max_attempts_dead_letter_and_replay(self) -> None:
        """An always-500 message is dead after max_attempts; replay puts it back in the list; 404 for unknown names."""
        self.redis.command("LPUSH", "leads", envelope("d1", {"b": "always-500"}))
        relayd = start_relayd(
            self,
            self.redis,
            deliver_toml(
                name="crm", list="leads", url=self.upstream.url, max_attempts=3, backoff="100ms",
                backoff_max="200ms", breaker_failures=100,
            ),
        )
        wait_for(lambda: self.redis.llen("leads:dead") == 1, WAIT, "dead letter")
        dead = json.loads(self.redis.items("leads:dead")[0])
        self.assertEqual(dead["error"]["status"], 500)
        self.assertEqual(dead["error"]["attempts"], 3)
        self.assertEqual(len(self.upstream.requests()), 3)
        # Stop delivering (upstream gone) so the replayed message stays visible in the list.
        self.upstream.stop()
        status, headers, body = admin_request(relayd.admin_port, "POST", "/deliver/nope/replay")
        self.assertEqual(status, 404)
        self.assertEqual(headers.get("content-type"), "application/problem+json")
        status, _, body = admin_request(relayd.admin_port, "POST", "/deliver/crm/replay")
        self.assertEqual((status, json.loads(body)["replayed"]), (200, 1))
        self.assertEqual(self.redis.llen("leads:dead"), 0)
        replayed = wait_for(self.all_items, WAIT, "the replayed item in the list (or claimed again)")
        self.assertEqual([json.loads(i)["id"] for i in replayed], ["d1"])

    def all_items(self) -> list:
        """Items in the list, its processing lists and its retry set (without retry headers)."""
        from relayd.deliver.message import parse_claimed

        items = list(self.redis.items("leads"))
        for key in self.redis.command("KEYS", "{leads}:processing:*"):
            items += self.redis.items(key.decode())
        items += self.redis.command("ZRANGE", "{leads}:retry:crm", 0, -1)
        return [parse_claimed(i).item for i in items]


class DeliverFaults(unittest.TestCase):
    """kill -9, Redis outages, graceful stop, connection bound."""

    def setUp(self) -> None:
        self.redis = RedisServer(self)
        self.upstream = UpstreamProcess(self)

    def test_kill_9_mid_delivery_redelivers_after_restart(self) -> None:
        """Messages in flight when relayd is SIGKILLed are delivered after a restart (lease expiry); none lost."""
        ids = [f"k{i}" for i in range(6)]
        for mid in ids:
            self.redis.command("LPUSH", "leads", envelope(mid, {"b": "slow-once"}))
        toml = deliver_toml(
            name="crm", list="leads", url=self.upstream.url, timeout="60s", concurrency=8, visibility_timeout="2s"
        )
        relayd = start_relayd(self, self.redis, toml)
        wait_for(lambda: len(self.upstream.requests()) == 6, WAIT, "all six requests hanging")
        self.assertEqual(self.upstream.delivered_ids(), set())
        relayd.kill()
        self.assertEqual(self.redis.llen("leads"), 0, "claimed, not in the list")
        relayd.start()
        wait_for(lambda: self.upstream.delivered_ids() == set(ids), WAIT, "redelivered after the lease expired")
        wait_for(lambda: self.redis.command("KEYS", "{leads}:processing:*") == [] or all(
            self.redis.llen(k.decode()) == 0 for k in self.redis.command("KEYS", "{leads}:processing:*")
        ), WAIT, "processing lists empty")

    def test_retry_survives_a_restart(self) -> None:
        """A message waiting for its retry stays in Redis across a restart; its attempts keep counting."""
        self.redis.command("LPUSH", "leads", envelope("s1", {"b": "always-500"}))
        toml = deliver_toml(
            name="crm", list="leads", url=self.upstream.url, max_attempts=2, backoff="3s", backoff_max="3s"
        )
        relayd = start_relayd(self, self.redis, toml)
        wait_for(lambda: len(self.upstream.requests()) == 1, WAIT, "the first attempt")
        wait_for(lambda: self.redis.command("ZCARD", "{leads}:retry:crm") == 1, WAIT, "the retry scheduled")
        self.assertEqual(relayd.terminate(), 0)
        self.assertEqual(self.redis.command("ZCARD", "{leads}:retry:crm"), 1, "still waiting after the stop")
        relayd.start()
        wait_for(lambda: self.redis.llen("leads:dead") == 1, WAIT, "dead after the second attempt")
        self.assertEqual(json.loads(self.redis.items("leads:dead")[0])["error"]["attempts"], 2)
        self.assertEqual(len(self.upstream.requests()), 2)

    def test_redis_down_10s_pauses_and_resumes(self) -> None:
        """Redis stopped for 10 s (and back empty): delivery pauses, then resumes; relayd stays up."""
        relayd = start_relayd(self, self.redis, deliver_toml(name="crm", list="leads", url=self.upstream.url))
        self.redis.command("LPUSH", "leads", envelope("before", {"b": "ok"}))
        wait_for(lambda: "before" in self.upstream.delivered_ids(), WAIT, "delivered before the outage")
        self.redis.stop()
        time.sleep(10)  # the outage itself (the assertion below polls)
        self.assertTrue(relayd.alive())
        self.redis.start()
        self.redis.command("LPUSH", "leads", envelope("after", {"b": "ok"}))
        wait_for(lambda: "after" in self.upstream.delivered_ids(), WAIT, "delivered after Redis came back")

    def test_graceful_stop_returns_unfinished_messages(self) -> None:
        """SIGTERM with requests stuck past shutdown_timeout: exit 0, the messages are back in the list."""
        for i in range(3):
            self.redis.command("LPUSH", "leads", envelope(f"g{i}", {"b": "slow-once"}))
        relayd = start_relayd(
            self,
            self.redis,
            deliver_toml(name="crm", list="leads", url=self.upstream.url, timeout="60s"),
            server={"shutdown_timeout": 1.0},
        )
        wait_for(lambda: len(self.upstream.requests()) == 3, WAIT, "three requests hanging")
        self.assertEqual(relayd.terminate(), 0)
        self.assertEqual(sorted(json.loads(i)["id"] for i in self.redis.items("leads")), ["g0", "g1", "g2"])
        self.assertEqual(self.redis.command("KEYS", "{leads}:processing:*"), [])

    def test_connections_stay_within_concurrency(self) -> None:
        """300 messages at concurrency 4: the upstream never sees more than 4 connections open at once."""
        for i in range(300):
            self.redis.command("LPUSH", "leads", envelope(f"c{i}", {"b": "close" if i % 50 == 0 else "ok"}))
        start_relayd(self, self.redis, deliver_toml(name="crm", list="leads", url=self.upstream.url, concurrency=4))
        wait_for(lambda: len(self.upstream.delivered_ids()) == 300, WAIT, "all delivered")
        self.assertLessEqual(self.upstream.max_open_connections(), 4)


class DeliverRate(unittest.TestCase):
    """The global rate, shared by two relayd processes."""

    def test_global_rate_within_10_percent_two_processes(self) -> None:
        """Two relayd processes on one Redis together start `rate` requests/s (+-10 % over 10 s)."""
        redis = RedisServer(self)
        upstream = UpstreamProcess(self)
        rate = 40
        for i in range(rate * 16):
            redis.command("LPUSH", "leads", envelope(f"r{i}", {"b": "ok"}))
        toml = deliver_toml(name="crm", list="leads", url=upstream.url, rate=f"{rate}/s", concurrency=8)
        a = start_relayd(self, redis, toml, wait_ready=False)
        b = start_relayd(self, redis, toml, wait_ready=False)
        a.wait_ready()
        b.wait_ready()
        # Measure a 10 s window that starts once both run, by the upstream's own arrival clock.
        start = wait_for(lambda: len(upstream.requests()) >= rate and upstream.requests()[-1]["t"], WAIT, "warm-up")
        wait_for(lambda: upstream.requests()[-1]["t"] >= start + 10.5, 60, "a 10 s window")
        times = [r["t"] for r in upstream.requests()]
        window = [t for t in times if start <= t < start + 10.0]
        self.assertAlmostEqual(len(window) / 10.0, rate, delta=rate * 0.10)
        for relayd in (a, b):
            _, _, body = relayd.get_admin("/metrics")
            attempts = [
                float(line.split()[-1]) for line in body.decode().splitlines()
                if line.startswith("relayd_deliver_attempts_total")
            ]
            self.assertGreater(sum(attempts), 0, "both processes delivered")


class DeliverOperations(unittest.TestCase):
    """Breaker visibility, SIGHUP, workers = N, bad config."""

    def setUp(self) -> None:
        self.redis = RedisServer(self)

    def test_breaker_opens_and_shows_in_admin_and_metrics(self) -> None:
        """Refused connections open the breaker (GET /deliver, metrics); a live upstream closes it and gets the message."""
        upstream = UpstreamProcess(self, start=False)  # nothing listens yet: connections are refused
        self.redis.command("LPUSH", "leads", envelope("b1", {"b": "ok"}))
        relayd = start_relayd(
            self,
            self.redis,
            deliver_toml(
                name="crm", list="leads", url=upstream.url, breaker_failures=2, backoff="500ms", backoff_max="1s",
                max_attempts=100,
            ),
        )

        def state() -> str:
            return json.loads(relayd.get_admin("/deliver")[2])["crm"]["state"]

        wait_for(lambda: state() in ("open", "half_open"), WAIT, "the breaker to open")
        metrics = relayd.get_admin("/metrics")[2].decode()
        self.assertRegex(metrics, r'relayd_deliver_attempts_total\{deliver="crm",result="error"\} [1-9]')
        upstream.start()
        wait_for(lambda: "b1" in upstream.delivered_ids(), WAIT, "delivered once the upstream is up")
        wait_for(lambda: state() == "closed", WAIT, "the breaker to close")
        self.assertIn('relayd_deliver_circuit_state{deliver="crm"} 0.0', relayd.get_admin("/metrics")[2].decode())

    def test_sighup_adds_changes_and_removes_delivers(self) -> None:
        """A deliver added by SIGHUP starts; one removed stops (its list then just queues)."""
        upstream = UpstreamProcess(self)
        relayd = start_relayd(self, self.redis, "")
        self.redis.command("LPUSH", "leads", envelope("h1", {"b": "ok"}))
        time.sleep(0.5)  # nothing consumes yet (checked right below)
        self.assertEqual(self.redis.llen("leads"), 1)
        relayd.rewrite_config([{"path": "/in", "list": "leads"}], deliver_toml(name="crm", list="leads", url=upstream.url))
        relayd.signal(signal.SIGHUP)
        wait_for(lambda: "h1" in upstream.delivered_ids(), WAIT, "delivered after the reload")
        self.assertIn("crm", json.loads(relayd.get_admin("/deliver")[2]))
        relayd.rewrite_config([{"path": "/in", "list": "leads"}], "")
        relayd.signal(signal.SIGHUP)
        wait_for(lambda: json.loads(relayd.get_admin("/deliver")[2] or b"{}") == {}, WAIT, "the deliver removed")
        self.redis.command("LPUSH", "leads", envelope("h2", {"b": "ok"}))
        time.sleep(1.0)  # would be delivered within ms if a consumer were left
        self.assertEqual(self.redis.llen("leads"), 1)
        self.assertTrue(relayd.alive())

    def test_workers_2_deliver_and_admin(self) -> None:
        """With workers = 2 both workers consume; the supervisor's /deliver and replay work."""
        upstream = UpstreamProcess(self)
        for i in range(50):
            self.redis.command("LPUSH", "leads", envelope(f"w{i}", {"b": "bad" if i == 0 else "ok"}))
        relayd = start_relayd(
            self,
            self.redis,
            deliver_toml(name="crm", list="leads", url=upstream.url, concurrency=2),
            server={"workers": 2},
        )
        wait_for(lambda: len(upstream.delivered_ids()) == 49, WAIT, "49 delivered")
        wait_for(lambda: json.loads(relayd.get_admin("/deliver")[2])["crm"]["dead"] == 1, WAIT, "one dead letter")
        info = json.loads(relayd.get_admin("/deliver")[2])["crm"]
        self.assertEqual(len(info["states"]), 2, "both workers answered")
        upstream.stop()
        status, _, body = admin_request(relayd.admin_port, "POST", "/deliver/crm/replay")
        self.assertEqual((status, json.loads(body)["replayed"]), (200, 1))

    def test_bad_deliver_config_exits_2_with_one_line(self) -> None:
        """A rate like "abc" stops relayd before it binds: exit 2, one stderr line naming the key."""
        relayd = start_relayd(
            self, self.redis, deliver_toml(name="crm", list="leads", url="http://127.0.0.1:1/", rate="abc"),
            wait_ready=False,
        )
        self.assertEqual(relayd.wait(), 2)
        lines = relayd.stderr_text().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("deliver[0].rate", lines[0])


class DeliverOnCluster(unittest.TestCase):
    """The same deliver against a Redis Cluster: every multi-key script stays in the list's slot."""

    def test_deliver_retry_and_dead_letter_on_a_cluster(self) -> None:
        """Deliveries, a retry (retry set + mover) and a dead letter (another slot) on 3 primaries; /deliver counts."""
        from tests.cluster_harness import RedisCluster
        from tests.harness import RelaydProcess

        cluster = RedisCluster(self, primaries=3, replicas=0)
        upstream = UpstreamProcess(self)
        self.assertNotEqual(cluster.slot_of("leads"), cluster.slot_of("leads:dead"))
        behaviours = ["ok", "ok", "fail-once", "bad", "ok"]
        for i, b in enumerate(behaviours):
            cluster.command_for("leads", "LPUSH", "leads", envelope(f"c{i}", {"b": b}))
        relayd = RelaydProcess(
            self, routes=[{"path": "/in", "list": "leads"}], redis_url=None, redis={"cluster": cluster.seeds[:1]},
            extra_toml=deliver_toml(name="crm", list="leads", url=upstream.url, backoff="100ms", backoff_max="200ms"),
        )
        wait_for(lambda: upstream.delivered_ids() == {"c0", "c1", "c2", "c4"}, WAIT, "four delivered")
        wait_for(lambda: cluster.llen("leads:dead") == 1, WAIT, "one dead letter")
        self.assertEqual(json.loads(cluster.items("leads:dead")[0])["error"]["status"], 400)
        info = json.loads(relayd.get_admin("/deliver")[2])["crm"]
        self.assertEqual((info["queued"], info["waiting_for_retry"], info["dead"]), (0, 0, 1))
