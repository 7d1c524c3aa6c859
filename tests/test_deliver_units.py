"""Delivery's pure parts: outcomes, backoff, breaker, gate, signing, items, keys, config.

test-case-name: tests.test_deliver_units
"""

from __future__ import annotations

import base64
import json
import time
import unittest

import ujson
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from relayd.config import ConfigError, config_from_string
from relayd.deliver import message as msg
from relayd.deliver.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from relayd.deliver.gate import Gate
from relayd.deliver.keys import DeliverKeys
from relayd.deliver.outcome import (
    DEAD,
    DONE,
    RETRY,
    backoff_delay,
    classify_error,
    classify_status,
    final_outcome,
    parse_retry_after,
)
from relayd.deliver.signing import secret_key, sign
from relayd.redis.keys import key_slot
from tests.strategies import http_statuses, list_items


class OutcomeTests(unittest.TestCase):
    """CONTRACT.md's outcome rules."""

    @given(http_statuses())
    def test_classification_follows_the_contract(self, status: int) -> None:
        """2xx done; 408/425/429/5xx retried; every other status dead at once."""
        kind = classify_status(status).kind
        if 200 <= status < 300:
            self.assertEqual(kind, DONE)
        elif status in (408, 425, 429) or status >= 500:
            self.assertEqual(kind, RETRY)
        else:
            self.assertEqual(kind, DEAD)

    def test_retry_after_only_from_429_and_503(self) -> None:
        """Retry-After is kept for 429/503 (it pauses the deliver), ignored on a 500."""
        self.assertEqual(classify_status(429, 7.0).retry_after, 7.0)
        self.assertEqual(classify_status(503, 7.0).retry_after, 7.0)
        self.assertIsNone(classify_status(500, 7.0).retry_after)

    def test_upstream_failures_count_for_the_breaker(self) -> None:
        """5xx, 408 and errors count as upstream failures; 4xx and 429 do not."""
        self.assertTrue(classify_status(502).upstream_failure)
        self.assertTrue(classify_status(408).upstream_failure)
        self.assertTrue(classify_error("refused").upstream_failure)
        self.assertFalse(classify_status(429).upstream_failure)
        self.assertFalse(classify_status(404).upstream_failure)

    def test_parse_retry_after(self) -> None:
        """Delta seconds, HTTP dates (relative to now), garbage and the cap."""
        self.assertEqual(parse_retry_after(b"5", 0.0), 5.0)
        self.assertEqual(parse_retry_after(b"99999999", 0.0), 3600.0)
        self.assertAlmostEqual(parse_retry_after(b"Thu, 01 Jan 1970 00:01:00 GMT", 30.0), 30.0)
        self.assertIsNone(parse_retry_after(b"soon", 0.0))
        self.assertIsNone(parse_retry_after(None, 0.0))

    def test_max_attempts_turns_a_retry_into_a_dead_letter(self) -> None:
        """A retry at max_attempts is dead with the same status; below it stays a retry."""
        outcome = classify_status(500)
        self.assertEqual(final_outcome(outcome, 2, 3).kind, RETRY)
        dead = final_outcome(outcome, 3, 3)
        self.assertEqual((dead.kind, dead.status), (DEAD, 500))
        self.assertEqual(final_outcome(classify_status(200), 3, 3).kind, DONE)

    @given(st.integers(1, 80), st.floats(0.001, 100), st.floats(0, 1))
    def test_backoff_is_bounded_and_jittered(self, attempts: int, base: float, r: float) -> None:
        """The delay is within [exp/2, exp] of the capped exponential, never above the cap."""
        cap = base * 50
        exp = min(cap, base * 2 ** (attempts - 1))
        delay = backoff_delay(attempts, base, cap, lambda: r)
        self.assertGreaterEqual(delay, exp / 2 - 1e-9)
        self.assertLessEqual(delay, exp + 1e-9)


class BreakerTests(unittest.TestCase):
    """The circuit breaker's state machine on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.breaker = CircuitBreaker(self.clock, threshold=3, base=1.0, cap=4.0)

    def test_opens_after_threshold_consecutive_failures(self) -> None:
        """Two failures keep it closed; a success resets the count; three in a row open it."""
        self.breaker.failure()
        self.breaker.failure()
        self.breaker.success()
        self.breaker.failure()
        self.breaker.failure()
        self.assertEqual(self.breaker.state, CLOSED)
        self.breaker.failure()
        self.assertEqual(self.breaker.state, OPEN)
        self.assertFalse(self.breaker.allow())
        self.assertAlmostEqual(self.breaker.wait(), 1.0)

    def test_half_open_lets_one_probe_and_its_result_decides(self) -> None:
        """After the open period one probe goes; failure reopens for twice as long (capped); success closes."""
        for _ in range(3):
            self.breaker.failure()
        self.clock.advance(1.0)
        self.assertEqual(self.breaker.state, HALF_OPEN)
        self.assertTrue(self.breaker.allow())
        self.assertFalse(self.breaker.allow(), "only one probe")
        self.breaker.failure()
        self.assertEqual(self.breaker.state, OPEN)
        self.assertAlmostEqual(self.breaker.wait(), 2.0)
        self.clock.advance(2.0)
        self.assertTrue(self.breaker.allow())
        self.breaker.failure()
        self.clock.advance(4.0)
        self.assertTrue(self.breaker.allow())
        self.breaker.failure()
        self.assertAlmostEqual(self.breaker.wait(), 4.0, msg="capped")
        self.clock.advance(4.0)
        self.assertTrue(self.breaker.allow())
        self.breaker.success()
        self.assertEqual(self.breaker.state, CLOSED)
        self.assertTrue(self.breaker.allow() and self.breaker.allow())


class FixedLimiter:
    """A rate limiter double: grants from a budget the test sets (injected, not patched)."""

    def __init__(self, unlimited: bool = False) -> None:
        self.unlimited = unlimited
        self.budget = 0
        self.asks = 0

    def take(self, want: int):  # type: ignore[no-untyped-def]
        """Grant min(want, budget)."""
        self.asks += 1
        n = min(want, self.budget)
        self.budget -= n
        return succeed((n, 0.5))


class GateTests(unittest.TestCase):
    """FIFO admission under pause, breaker and rate."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.breaker = CircuitBreaker(self.clock, threshold=1, base=1.0, cap=1.0)
        self.limiter = FixedLimiter()
        self.gate = Gate(self.clock, self.breaker, self.limiter)  # type: ignore[arg-type]

    def test_permits_are_granted_in_order(self) -> None:
        """Waiters pass in arrival order, as permits arrive."""
        passed = []
        for i in range(3):
            self.gate.enter().addCallback(lambda _, i=i: passed.append(i))
        self.assertEqual(passed, [])
        self.limiter.budget = 2
        self.clock.advance(0.5)
        self.assertEqual(passed, [0, 1])
        self.limiter.budget = 5
        self.clock.advance(0.5)
        self.assertEqual(passed, [0, 1, 2])

    def test_pause_holds_everyone(self) -> None:
        """A Retry-After pause stops all waiters until it ends."""
        self.limiter.unlimited = True
        self.gate.pause(2.0)
        passed = []
        self.gate.enter().addCallback(passed.append)
        self.clock.advance(1.9)
        self.assertEqual(passed, [])
        self.clock.advance(0.2)
        self.assertEqual(len(passed), 1)

    def test_open_breaker_holds_then_probes_once(self) -> None:
        """With the breaker open nothing passes; half-open lets one through."""
        self.limiter.unlimited = True
        self.breaker.failure()
        passed = []
        self.gate.enter().addCallback(lambda _: passed.append("a"))
        self.gate.enter().addCallback(lambda _: passed.append("b"))
        self.assertEqual(passed, [])
        self.clock.advance(1.0)
        self.assertEqual(passed, ["a"])
        self.breaker.success()
        self.gate.pump()
        self.assertEqual(passed, ["a", "b"])

    def test_close_fails_waiters(self) -> None:
        """At stop, waiters get CancelledError (their items are returned to the list)."""
        errors = []
        self.gate.enter().addErrback(errors.append)
        self.gate.close()
        self.assertEqual(len(errors), 1)


class SigningTests(unittest.TestCase):
    """Standard Webhooks signatures, checked by the reference library."""

    @given(st.binary(min_size=16, max_size=40), st.text("abcdef0123456789-_", min_size=1, max_size=30), st.text(max_size=50))
    def test_reference_library_verifies(self, key: bytes, mid: str, body: str) -> None:
        """Every signature we make verifies with `standardwebhooks`."""
        from standardwebhooks.webhooks import Webhook, WebhookVerificationError

        secret = "whsec_" + base64.b64encode(key).decode()
        now = int(time.time())  # the library checks the timestamp against its own clock (5 min tolerance)
        headers = {k.decode(): v.decode() for k, v in sign(secret_key(secret), mid, now, body.encode()).items()}
        Webhook(secret).verify(body.encode(), headers, json_parse=False)  # raises when wrong
        headers["webhook-signature"] = "v1," + base64.b64encode(b"x" * 32).decode()
        with self.assertRaises(WebhookVerificationError):
            Webhook(secret).verify(body.encode(), headers, json_parse=False)

    def test_plain_secret_is_used_as_bytes(self) -> None:
        """A secret without the whsec_ prefix is the key's bytes, stripped."""
        self.assertEqual(secret_key("  s3cret \n"), b"s3cret")


class MessageTests(unittest.TestCase):
    """List items -> requests, retry headers, dead letters and replay."""

    @given(list_items(), st.integers(1, 1000), st.floats(0, 2e9))
    def test_retry_header_round_trips(self, item: bytes, attempts: int, ts: float) -> None:
        """wrap_retry then parse_claimed gives back the exact item and its state."""
        claimed = msg.parse_claimed(msg.wrap_retry(item, attempts, ts))
        self.assertEqual((claimed.item, claimed.attempts), (item, attempts))
        self.assertAlmostEqual(claimed.first_ts, ts, delta=0.001)
        self.assertEqual(msg.parse_claimed(item).item, item)

    @given(list_items())
    def test_every_item_becomes_a_request(self, item: bytes) -> None:
        """Never raises; a stable id; non-envelopes are sent as they are."""
        request = msg.to_request(item)
        self.assertEqual(request, msg.to_request(item))
        self.assertTrue(request.message_id)
        if not msg.is_envelope(_loads(item)):
            self.assertEqual(request.body, item)

    def test_envelope_bodies(self) -> None:
        """A JSON body is re-encoded, a string body sent as its UTF-8 bytes, with the envelope's type."""
        r = msg.to_request(b'{"id":"a","ts":2.5,"content_type":"application/json","body":{"x":"/"}}')
        self.assertEqual((r.message_id, r.body, r.content_type, r.ts), ("a", b'{"x":"/"}', "application/json", 2.5))
        r = msg.to_request(b'{"id":"b","ts":1,"content_type":"text/csv","body":"a,b\\u00e9"}')
        self.assertEqual((r.body, r.content_type), ("a,b\u00e9".encode(), "text/csv"))
        r = msg.to_request(b"\xff\x00")
        self.assertEqual(r.content_type, "application/octet-stream")

    @given(list_items())
    def test_dead_letter_shape_and_replay(self, item: bytes) -> None:
        """The dead letter has the contract's fields; replay restores the item (JSON: the same value)."""
        dead = json.loads(msg.dead_letter(item, 500, "boom", 3, 10.0, 20.0))
        self.assertEqual(
            {k: dead["error"][k] for k in ("status", "detail", "attempts", "first_ts", "last_ts")},
            {"status": 500, "detail": "boom", "attempts": 3, "first_ts": 10.0, "last_ts": 20.0},
        )
        back = msg.replayed_item(msg.dead_letter(item, None, "x", 1, 1.0, 1.0))
        value = _loads(item)
        if value is _NOT_JSON:
            self.assertEqual(back, item)
        else:
            self.assertEqual(repr(ujson.loads(back)), repr(value))  # repr: ujson reads b"NaN", and NaN != NaN


_NOT_JSON = object()


def _loads(item: bytes):  # type: ignore[no-untyped-def]
    try:
        return ujson.loads(item)
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON


class KeysTests(unittest.TestCase):
    """Every multi-key script's keys share the list's Cluster slot."""

    @given(st.text("abcdefgh:{}-", min_size=1, max_size=12))
    def test_companions_share_the_lists_slot(self, name: str) -> None:
        """processing, lease, consumers, retry and rate hash like the list (when the list can have companions)."""
        if "}" in name and (name.find("{") == -1 or name.find("}") < name.find("{")):
            return  # rejected by the config
        try:
            keys = DeliverKeys.for_deliver(name, "crm", name + ":dead", "host-1-ab")
        except ValueError:
            return
        slot = key_slot(name.encode())
        for k in (keys.processing, keys.lease, keys.consumers, keys.retry, keys.rate, keys.processing_of(b"p2")):
            self.assertEqual(key_slot(k), slot, k)


BASE = '[[route]]\npath = "/a"\nlist = "leads"\n'
DELIVER = '[[deliver]]\nname = "crm"\nlist = "leads"\nurl = "http://127.0.0.1:8000/api"\n'


class DeliverConfigTests(unittest.TestCase):
    """``[[deliver]]`` parsing: defaults, and one-line errors naming the key."""

    def error(self, extra: str, deliver: str = DELIVER) -> str:
        """The ConfigError message for a deliver table plus `extra` lines."""
        with self.assertRaises(ConfigError) as cm:
            config_from_string(BASE + deliver + extra)
        message = str(cm.exception)
        self.assertNotIn("\n", message)
        return message

    def test_defaults(self) -> None:
        """A minimal deliver gets the contract's defaults; no [[deliver]] at all is fine."""
        d = config_from_string(BASE + DELIVER).delivers[0]
        self.assertEqual((d.method, d.concurrency, d.timeout, d.max_attempts), ("POST", 16, 10.0, 10))
        self.assertEqual((d.backoff, d.backoff_max, d.dead_letter, d.rate), (1.0, 600.0, "leads:dead", None))
        self.assertEqual(config_from_string(BASE).delivers, ())

    def test_contract_example_parses(self) -> None:
        """The CONTRACT.md example loads as written."""
        d = config_from_string(
            BASE + DELIVER + 'method = "POST"\nheaders = { Authorization = "Bearer x" }\nrate = "200/s"\n'
            'concurrency = 16\ntimeout = "10s"\nmax_attempts = 10\nbackoff = "1s"\nbackoff_max = "10m"\n'
            'dead_letter = "leads:dead"\nsign_secret_file = "etc/crm.secret"\n'
        ).delivers[0]
        self.assertEqual((d.rate, d.headers, d.backoff_max), ((200.0, 1.0), (("Authorization", "Bearer x"),), 600.0))

    def test_bad_values_name_the_key(self) -> None:
        """Unknown key, bad URL, rate "abc", max_attempts = 0, and friends."""
        self.assertIn("deliver[0].colour: unknown key", self.error('colour = "red"\n'))
        self.assertIn("deliver[0].rate", self.error('rate = "abc"\n'))
        self.assertIn("deliver[0].max_attempts", self.error("max_attempts = 0\n"))
        self.assertIn("deliver[0].timeout", self.error('timeout = "soon"\n'))
        self.assertIn("deliver[0].backoff_max", self.error('backoff = "10s"\nbackoff_max = "1s"\n'))
        self.assertIn("deliver[0].method", self.error('method = "GET"\n'))
        bad_url = DELIVER.replace("http://127.0.0.1:8000/api", "ftp://x/")
        self.assertIn("deliver[0].url", self.error("", bad_url))
        self.assertIn("deliver[0].url", self.error("", DELIVER.replace(":8000", ":99999")))
        self.assertIn("deliver[1].name: duplicate", self.error(DELIVER))
        self.assertIn("deliver[0].name", self.error("", DELIVER.replace('"crm"', '"a/b"')))


class DeliverMetricsTests(unittest.TestCase):
    """A deliver removed by SIGHUP leaves no series behind."""

    def test_forget_deliver_drops_every_series(self) -> None:
        """After forget_deliver, no sample carries the deliver's label (its gauges no longer read a stopped service)."""
        from relayd.ops.metrics import Metrics

        metrics = Metrics()
        d = metrics.deliver("crm")
        d.attempt("2xx")
        d.attempt("error")
        d.retries.inc()
        d.latency.observe(0.01)
        d.in_flight.set_function(lambda: 3.0)
        metrics.deliver("other").attempt("2xx")
        self.assertIn(b'deliver="crm"', metrics.exposition())
        metrics.forget_deliver("crm")
        text = metrics.exposition()
        self.assertNotIn(b'deliver="crm"', text)
        self.assertIn(b'deliver="other"', text)
