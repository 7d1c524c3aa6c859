"""Ingest: the Klein surface (via StubTreq) and the hot path (via real bytes)."""

from __future__ import annotations

import json

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from relayd.codec import decode_envelope
from relayd.config import RouteConfig
from relayd.ids import IdGenerator
from relayd.ingest.app import IngestApp, IngestRoute
from relayd.ingest.http_layer import IngestSite
from relayd.ingest.validation import compile_schema
from relayd.ops.metrics import Metrics
from relayd.outbox.buffer import RingBuffer
from relayd.outbox.targets import ListTarget

INCREMENT = compile_schema(
    {
        "type": "object",
        "properties": {"key": {"type": "string", "format": "uuid"}, "value": {"type": "integer", "minimum": 1}},
        "required": ["key", "value"],
        "additionalProperties": False,
    }
)
KEY = "6f1c3c56-2f0a-4c1f-9e4b-2a1c5b9d8e7f"


class FakeRedisReadiness:
    """The one thing ingest asks of storage: can Redis or the spool take writes now?"""

    ready = True


class IngestFixture:
    """An IngestApp over a real buffer, a Clock and a readiness switch."""

    def make(self, max_messages=1000, ack_timeout=10.0):
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.metrics = Metrics()
        self.buffer = RingBuffer(max_messages, 10**8)
        self.redis = FakeRedisReadiness()
        routes = [
            RouteConfig(path="/leads", list="leads"),
            RouteConfig(path="/events", list="events", ack="accepted", max_body=64),
            RouteConfig(path="/increments", list="increments", ack="accepted"),
            RouteConfig(path="/raw", list="raw", ack="accepted", format="body"),
        ]
        validators = {"/increments": INCREMENT}
        self.app = IngestApp(
            self.clock,
            [IngestRoute(r, validators.get(r.path), self.metrics.route(r.path), self.clock) for r in routes],
            self.buffer,
            lambda count, size: self.redis.ready,
            IdGenerator(self.clock.seconds, node=7),
            self.metrics,
            ack_timeout,
        )
        self.app.start()
        self.treq = StubTreq(self.app.resource())

    def post(self, path, body, ctype=b"application/json"):
        headers = {b"Content-Type": [ctype]} if ctype else {}
        return self.treq.post("http://relayd" + path, data=body, headers=headers)

    def store_all(self):
        """Play the forwarder: everything queued is now in Redis."""
        batch = self.buffer.take(10**6, 10**9)
        self.buffer.settle_stored(batch)
        self.treq.flush()
        return batch


class KleinSurfaceTests(SynchronousTestCase, IngestFixture):
    """Behaviour through the Klein resource, with treq's in-memory agent."""

    def setUp(self):
        self.make()

    def response(self, d):
        resp = self.successResultOf(d)
        body = self.successResultOf(resp.content())
        return resp, body

    def assertProblem(self, d, status):
        resp, body = self.response(d)
        self.assertEqual(resp.code, status)
        self.assertEqual(resp.headers.getRawHeaders(b"content-type"), [b"application/problem+json"])
        doc = json.loads(body)
        self.assertEqual(doc["status"], status)
        self.assertTrue(doc["type"].startswith("https://"))
        self.assertIn("title", doc)
        self.assertIn("detail", doc)
        return resp, doc

    def test_accepted_route_answers_at_once(self):
        """ack=accepted: 200 with the id as soon as the message is in memory."""
        resp, body = self.response(self.post("/events", b'{"a": 1}'))
        self.assertEqual(resp.code, 200)
        doc = json.loads(body)
        self.assertEqual(doc["status"], "OK")
        [(key, [item], waiter, _)] = self.buffer.take(10, 10**6)
        env = decode_envelope(item)
        self.assertEqual((key, env["id"], env["body"], env["route"]), (ListTarget(b"events"), doc["id"], {"a": 1}, "/events"))
        self.assertEqual(env["ts"], 1700000000.0)
        self.assertIsNone(waiter)

    def test_relayd_ack_stored_strengthens_an_accepted_route(self):
        """``Relayd-Ack: stored`` on an accepted route: no answer until the message is stored."""
        d = self.treq.post(
            "http://relayd/events",
            data=b'{"a": 1}',
            headers={b"Content-Type": [b"application/json"], b"Relayd-Ack": [b"stored"]},
        )
        self.treq.flush()
        self.assertNoResult(d)
        self.store_all()
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_stored_route_waits_for_redis(self):
        """ack=stored: no answer until the forwarder stored the message."""
        d = self.post("/leads", b'{"message": "this is a lead message", "shop": "a23m07b23"}')
        self.assertNoResult(d)
        self.store_all()
        resp, body = self.response(d)
        self.assertEqual(resp.code, 200)
        self.assertEqual(json.loads(body)["status"], "OK")

    def test_stored_route_without_redis_is_503(self):
        """ack=stored while neither Redis nor the spool can store: 503 + Retry-After, nothing queued."""
        self.redis.ready = False
        resp, doc = self.assertProblem(self.post("/leads", b"{}"), 503)
        self.assertEqual(resp.headers.getRawHeaders(b"retry-after"), [b"5"])
        self.assertEqual(self.buffer.messages, 0)

    def test_full_buffer_is_503(self):
        """A full buffer refuses with 503 + Retry-After and keeps what it had."""
        self.make(max_messages=2)
        self.response(self.post("/events", b"1"))
        self.response(self.post("/events", b"2"))
        resp, doc = self.assertProblem(self.post("/events", b"3"), 503)
        self.assertEqual(resp.headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(self.buffer.messages, 2)

    def test_ack_timeout_changes_nothing(self):
        """A stored ack that times out before the push is 503 and the message is dropped."""
        self.make(ack_timeout=2.0)
        d = self.post("/leads", b'{"x": 1}')
        self.clock.advance(2.5)
        self.treq.flush()
        resp, doc = self.assertProblem(d, 503)
        self.assertIn("nothing was stored", doc["detail"])
        self.assertEqual(self.buffer.take(10, 10**6), [])
        self.assertEqual(self.buffer.messages, 0)

    def test_schema_violation_enqueues_nothing(self):
        """A 400 for a schema violation leaves the buffer untouched."""
        resp, doc = self.assertProblem(self.post("/increments", b'{"key": "nope", "value": 1}'), 400)
        self.assertEqual(doc["field"], "/key")
        self.assertEqual(self.buffer.messages, 0)
        resp, _ = self.response(self.post("/increments", json.dumps({"key": KEY, "value": 3}).encode()))
        self.assertEqual(resp.code, 200)

    def test_ndjson_batch(self):
        """A batch answers with every id, in order, and queues every line."""
        lines = b"\n".join(b'{"n": %d}' % i for i in range(50))
        d = self.post("/leads", lines, b"application/x-ndjson")
        batch = self.store_all()
        resp, body = self.response(d)
        doc = json.loads(body)
        self.assertEqual(doc["accepted"], 50)
        self.assertEqual(doc["ids"], sorted(doc["ids"]))
        items = [item for run in batch for item in run[1]]
        self.assertEqual([decode_envelope(item)["id"] for item in items], doc["ids"])
        self.assertEqual([decode_envelope(item)["body"] for item in items], [{"n": i} for i in range(50)])

    def test_format_body_pushes_raw_bytes(self):
        """format=body pushes the body bytes exactly."""
        self.response(self.post("/raw", b'{"a":   1}'))
        [(_, [item], _, _)] = self.buffer.take(10, 10**6)
        self.assertEqual(item, b'{"a":   1}')

    def test_unknown_route_and_method(self):
        """404 and 405 (with Allow) are problem documents."""
        self.assertProblem(self.post("/nope", b"{}"), 404)
        resp, _ = self.assertProblem(self.treq.get("http://relayd/leads"), 405)
        self.assertEqual(resp.headers.getRawHeaders(b"allow"), [b"POST"])

    def test_graceful_stop_waits_for_stored_acks(self):
        """wait_idle fires only after in-flight stored requests are answered."""
        d = self.post("/leads", b"{}")
        self.app.begin_stop()
        stopped = self.app.wait_idle()
        self.assertNoResult(stopped)
        self.store_all()
        self.successResultOf(stopped)
        self.assertEqual(self.response(d)[0].code, 200)


class HotPathTests(SynchronousTestCase, IngestFixture):
    """The real HTTP layer (IngestSite/IngestChannel) driven with bytes."""

    def setUp(self):
        self.make()
        self.site = IngestSite(self.app, self.metrics, 60.0, self.clock)
        self.channel = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def test_post_over_the_wire(self):
        """A keep-alive POST gets a 200 with Content-Length and the id."""
        body = b'{"a": 1}'
        self.channel.dataReceived(
            b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out)
        self.assertIn(b"Content-Length: 53\r\n", out)
        self.assertIn(b'"status":"OK"', out)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.buffer.messages, 1)

    def test_stopping_serves_then_closes(self):
        """While stopping, a request on an open keep-alive is still served, then the connection closes."""
        self.app.begin_stop()
        body = b'{"a": 1}'
        self.channel.dataReceived(
            b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out)
        self.assertIn(b"Connection: close\r\n", out)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.buffer.messages, 1)

    def test_413_before_the_body(self):
        """An oversized Content-Length is refused after the headers alone."""
        self.channel.dataReceived(
            b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        )
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out)
        self.assertIn(b"application/problem+json", out)
        self.assertTrue(self.transport.disconnecting)
        self.channel.dataReceived(b"x" * 100000)  # ignored
        self.assertEqual(self.buffer.messages, 0)

    def test_chunked_body_cut_at_the_cap(self):
        """A chunked body is counted as it arrives and cut at max_body."""
        self.channel.dataReceived(
            b"POST /events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"40\r\n" + b"a" * 64 + b"\r\n" + b"1\r\nb\r\n0\r\n\r\n"
        )
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(self.buffer.messages, 0)

    def test_411_without_length(self):
        """A POST with neither Content-Length nor chunking is 411."""
        self.channel.dataReceived(b"POST /events HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 411 "), self.transport.value())

    def test_404_over_the_wire(self):
        """Non-hot requests go through Klein and still get problem documents."""
        self.channel.dataReceived(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 404 "), out)
        self.assertIn(b"application/problem+json", out)


class RateLimitedOverloadTests(SynchronousTestCase, IngestFixture):
    """A 503 after the rate limiter does not spend the client's tokens."""

    def test_overload_refunds_tokens(self):
        """Buffer full -> 503; once there is room, the same client is not 429'd for the refused tries."""
        self.make(max_messages=1)
        limited = RouteConfig(path="/limited", list="l", ack="accepted", rate_limit=(2.0, 60.0), rate_burst=2)
        route = IngestRoute(limited, None, self.metrics.route("/limited"), self.clock)
        self.app.replace_routes([route])
        self.assertEqual(self.successResultOf(self.post("/limited", b"1")).code, 200)
        for _ in range(3):
            self.assertEqual(self.successResultOf(self.post("/limited", b"2")).code, 503)
        self.buffer.settle_stored(self.buffer.take(10, 10**6))
        self.assertEqual(self.successResultOf(self.post("/limited", b"3")).code, 200)
        self.assertEqual(self.successResultOf(self.post("/limited", b"4")).code, 429)
