"""Black-box tests of the relayd contract (/work/shared/CONTRACT.md).

Each test runs the real daemon (``twistd -n relayd --config ...``) against a
real ``redis-server`` on a free port, speaks plain HTTP to it and reads Redis
with a raw RESP client (tests/harness.py).  Nothing is mocked and nothing in
relayd is imported: these tests see only what a user sees.

"Nothing enqueued" is proven without sleeping: after the rejected request the
test posts a valid sentinel on the same route and waits for it; lists are
FIFO per worker process (``workers = 1`` here), so anything the rejected
request had enqueued would arrive before the sentinel.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import threading
import time
import types
import unittest
import uuid
from typing import Any

from tests.harness import (
    Oracle,
    RedisServer,
    RelaydProcess,
    Response,
    json_body,
    ndjson,
    port_accepts,
    wait_for,
)

#: Seconds a message acknowledged with ack = "stored" may take to show up in
#: Redis (it is normally there already; the spool path may add a flush).
ARRIVAL_TIMEOUT = 10.0
#: A bad config must end the process "quickly": Python + Twisted imports
#: take ~1 s; leave room for a loaded CI machine.
BAD_CONFIG_EXIT_TIMEOUT = 15.0

INCREMENT_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "increment",
    "type": "object",
    "properties": {
        "key": {"type": "string", "format": "uuid"},
        "value": {"type": "integer", "minimum": 1},
    },
    "required": ["key", "value"],
    "additionalProperties": False,
}

ENVELOPE_KEYS = {"id", "ts", "route", "content_type", "body"}


def _class_fixture_owner(cls: type) -> Any:
    """Something with ``addCleanup`` that cleans up when the class is done."""
    return types.SimpleNamespace(addCleanup=cls.addClassCleanup)


class RelayTestCase(unittest.TestCase):
    """Assertion helpers shared by the integration tests."""

    redis: RedisServer
    relayd: RelaydProcess

    def assert_2xx(self, resp: Response) -> Any:
        """The response is 2xx with a JSON body; return the parsed body."""
        status, headers, body = resp
        self.assertTrue(200 <= status < 300, f"expected 2xx, got {status}: {body[:500]!r}")
        self.assertEqual(headers.get("content-type", "").split(";")[0].strip(), "application/json", headers)
        return json_body(resp)

    def assert_problem(self, resp: Response, status: int, *mentions: str) -> dict:
        """The response is an RFC 9457 problem with `status`; `detail` names each of `mentions`."""
        code, headers, body = resp
        self.assertEqual(code, status, f"expected {status}, got {code}: {body[:500]!r}")
        ctype = headers.get("content-type", "")
        self.assertEqual(ctype.split(";")[0].strip(), "application/problem+json", f"content-type {ctype!r}")
        doc = json_body(resp)
        self.assertIsInstance(doc, dict)
        for member in ("type", "title", "status", "detail"):
            self.assertIn(member, doc, f"problem document lacks {member!r}: {doc}")
        self.assertEqual(doc["status"], status, doc)
        for member in ("type", "title", "detail"):
            self.assertIsInstance(doc[member], str, doc)
            self.assertTrue(doc[member], doc)
        for word in mentions:
            self.assertRegex(doc["detail"], rf"(?<![\w]){re.escape(word)}(?![\w])", f"detail should name {word!r}")
        return doc

    def wait_llen(self, list_key: str, n: int, timeout: float = ARRIVAL_TIMEOUT) -> None:
        """Wait until the list holds at least `n` items (fail after `timeout`)."""
        wait_for(lambda: self.redis.llen(list_key) >= n, timeout, f"{n} item(s) in {list_key!r}")

    def envelopes(self, list_key: str) -> list:
        """The list's items, oldest first, parsed as JSON envelopes."""
        out = []
        for item in self.redis.items(list_key):
            value = json.loads(item)
            self.assertIsInstance(value, dict, item)
            out.append(value)
        return out

    def assert_only_sentinel_follows(self, path: str, list_key: str, before: int) -> None:
        """Post a sentinel; the list must grow by exactly that one item.

        Proves the requests made since the list held `before` items enqueued
        nothing (FIFO per worker: their items would precede the sentinel).
        """
        marker = {"sentinel": uuid.uuid4().hex}
        if path == "/increments":
            marker = {"key": str(uuid.uuid4()), "value": 1}
        self.assert_2xx(self.relayd.post(path, json.dumps(marker).encode()))
        self.wait_llen(list_key, before + 1)
        items = self.envelopes(list_key)
        self.assertEqual(len(items), before + 1, f"rejected requests enqueued: {items[before:]}")
        self.assertEqual(items[-1]["body"], marker)


class ApiContractTests(RelayTestCase):
    """Ingest API, envelope and error behaviour against one shared relayd."""

    @classmethod
    def setUpClass(cls) -> None:
        owner = _class_fixture_owner(cls)
        cls.redis = RedisServer(owner)
        cls.relayd = RelaydProcess(
            owner,
            routes=[
                {"path": "/leads", "list": "leads"},
                {"path": "/increments", "list": "increments", "schema": "schemas/increment.json"},
                {"path": "/small", "list": "small", "max_body": "1KiB"},
                {"path": "/batch", "list": "batch"},
                {"path": "/metered", "list": "metered"},
                {"path": "/raw", "list": "raw", "format": "body"},
            ],
            redis_url=cls.redis.url,
            files={"schemas/increment.json": INCREMENT_SCHEMA},
        )

    def setUp(self) -> None:
        for key in ("leads", "increments", "small", "batch", "metered", "raw"):
            self.redis.drain(key)

    # 1 ----------------------------------------------------------------------

    def test_lead_is_acknowledged_and_enveloped(self) -> None:
        """A crowd-style lead POST gets {"status":"OK","id":...} and lands in Redis as one full envelope."""
        lead = {"message": "this is a lead message", "shop": "a23m07b23"}
        before = time.time()
        doc = self.assert_2xx(self.relayd.post("/leads", json.dumps(lead).encode()))
        after = time.time()
        self.assertEqual(set(doc), {"status", "id"}, doc)
        self.assertEqual(doc["status"], "OK")
        self.assertIsInstance(doc["id"], str)
        self.assertTrue(doc["id"])

        self.wait_llen("leads", 1)
        (envelope,) = self.envelopes("leads")
        self.assertEqual(set(envelope), ENVELOPE_KEYS, envelope)
        self.assertEqual(envelope["id"], doc["id"])
        self.assertIsInstance(envelope["ts"], float)
        self.assertGreaterEqual(envelope["ts"], before - 2.0)
        self.assertLessEqual(envelope["ts"], after + 2.0)
        self.assertEqual(envelope["route"], "/leads")
        self.assertEqual(envelope["content_type"], "application/json")
        self.assertEqual(envelope["body"], lead)

    def test_non_json_body_is_enveloped_as_string(self) -> None:
        """A text/plain body on a route without schema is kept as a string in the envelope's body."""
        doc = self.assert_2xx(self.relayd.post("/leads", b"plain words", {"Content-Type": "text/plain"}))
        self.wait_llen("leads", 1)
        (envelope,) = self.envelopes("leads")
        self.assertEqual(envelope["id"], doc["id"])
        self.assertEqual(envelope["body"], "plain words")
        self.assertEqual(envelope["content_type"], "text/plain")

    def test_format_body_pushes_raw_bytes(self) -> None:
        """A route with format = "body" pushes exactly the posted bytes, binary included (CR, LF, NUL, non-UTF-8)."""
        binary = bytes(range(256)) * 2 + b"\r\n\x00"
        doc = self.assert_2xx(self.relayd.post("/raw", binary, {"Content-Type": "application/octet-stream"}))
        self.assertEqual(doc["status"], "OK")
        self.wait_llen("raw", 1)
        self.assertEqual(self.redis.items("raw"), [binary])

    def test_format_body_keeps_json_bytes(self) -> None:
        """A route with format = "body" pushes a JSON body byte for byte (not re-serialized, no envelope)."""
        spaced = b'{ "a" :  1 ,"b":[ 2 ] }'
        self.assert_2xx(self.relayd.post("/raw", spaced))
        self.wait_llen("raw", 1)
        self.assertEqual(self.redis.items("raw"), [spaced])

    def test_chunked_body_cannot_bypass_max_body(self) -> None:
        """A chunked (no Content-Length) body over max_body is refused (411 or 413 problem), never enqueued."""
        body = b'{"p": "' + b"x" * 4096 + b'"}'
        status, headers, data = self.relayd.request(
            "POST",
            "/small",
            iter([body[:1000], body[1000:]]),
            {"Content-Type": "application/json"},
            keep_alive=False,  # an iterable body: http.client sends it chunked
        )
        self.assertIn(status, (411, 413), data[:300])
        self.assert_problem((status, headers, data), status)
        self.assert_only_sentinel_follows("/small", "small", 0)

    # 2 ----------------------------------------------------------------------

    def test_schema_route_accepts_valid_increment(self) -> None:
        """A body valid against the route's schema is acknowledged and enqueued unchanged (charset parameter allowed)."""
        good = {"key": str(uuid.uuid4()), "value": 3}
        doc = self.assert_2xx(self.relayd.post("/increments", json.dumps(good).encode()))
        good2 = {"key": str(uuid.uuid4()), "value": 1}
        doc2 = self.assert_2xx(
            self.relayd.post(
                "/increments", json.dumps(good2).encode(), {"Content-Type": "application/json; charset=utf-8"}
            )
        )
        self.wait_llen("increments", 2)
        items = self.envelopes("increments")
        self.assertEqual([(e["id"], e["body"]) for e in items], [(doc["id"], good), (doc2["id"], good2)])

    def test_schema_violations_are_400_and_enqueue_nothing(self) -> None:
        """Each schema violation or malformed body is a 400 problem naming the field, and nothing is enqueued."""
        key = str(uuid.uuid4())
        cases = [
            ("non-UUID key", json.dumps({"key": "not-a-uuid", "value": 1}), ["key"]),
            ("value 0", json.dumps({"key": key, "value": 0}), ["value"]),
            ('value "1"', json.dumps({"key": key, "value": "1"}), ["value"]),
            ("value 1.5", json.dumps({"key": key, "value": 1.5}), ["value"]),
            ("value true", json.dumps({"key": key, "value": True}), ["value"]),
            ("extra field", json.dumps({"key": key, "value": 1, "colour": "red"}), ["colour"]),
            ("missing key", json.dumps({"value": 1}), ["key"]),
            ("malformed JSON", '{"key": "' + key + '", "value": 1', []),
            ("JSON array", json.dumps([{"key": key, "value": 1}]), []),
        ]
        for name, body, fields in cases:
            with self.subTest(name):
                self.assert_problem(self.relayd.post("/increments", body.encode()), 400, *fields)
        self.assertEqual(self.redis.llen("increments"), 0)
        self.assert_only_sentinel_follows("/increments", "increments", 0)

    # 3 ----------------------------------------------------------------------

    def test_ndjson_batch_of_1000(self) -> None:
        """A 1000-line NDJSON batch is acknowledged with 1000 sorted unique ids and lands in posted order."""
        lines = [{"i": i, "pad": "x" * (i % 17)} for i in range(1000)]
        resp = self.relayd.post("/batch", ndjson(lines), {"Content-Type": "application/x-ndjson"})
        doc = self.assert_2xx(resp)
        self.assertEqual(set(doc), {"status", "accepted", "ids"}, {k: doc[k] for k in doc if k != "ids"})
        self.assertEqual(doc["status"], "OK")
        self.assertEqual(doc["accepted"], 1000)
        ids = doc["ids"]
        self.assertEqual(len(ids), 1000)
        self.assertTrue(all(isinstance(i, str) and i for i in ids))
        self.assertEqual(len(set(ids)), 1000, "ids are not unique")
        self.assertEqual(ids, sorted(ids), "ids are not ascending")

        self.wait_llen("batch", 1000)
        items = self.envelopes("batch")
        self.assertEqual(len(items), 1000)
        self.assertEqual([e["body"] for e in items], lines, "Redis order (oldest first) differs from posted order")
        self.assertEqual([e["id"] for e in items], ids)
        self.assertEqual({e["route"] for e in items}, {"/batch"})

    def test_ids_are_time_ordered_across_requests(self) -> None:
        """Ids from successive requests (single and batch) keep ascending within one process."""
        seen = []
        for i in range(5):
            seen.append(self.assert_2xx(self.relayd.post("/leads", json.dumps({"n": i}).encode()))["id"])
            batch = self.relayd.post("/leads", ndjson([{"b": i}, {"b": i}]), {"Content-Type": "application/x-ndjson"})
            seen.extend(self.assert_2xx(batch)["ids"])
        self.assertEqual(len(set(seen)), len(seen))
        self.assertEqual(seen, sorted(seen))

    def test_ndjson_blank_lines_are_skipped(self) -> None:
        """Empty lines in an NDJSON batch are not messages; every non-empty line is one."""
        body = b'{"a": 1}\n\n{"a": 2}\r\n\n{"a": 3}'  # no trailing newline on the last line
        doc = self.assert_2xx(self.relayd.post("/batch", body, {"Content-Type": "application/x-ndjson"}))
        self.assertEqual(doc["accepted"], 3)
        self.wait_llen("batch", 3)
        self.assertEqual([e["body"] for e in self.envelopes("batch")], [{"a": 1}, {"a": 2}, {"a": 3}])

    def test_ndjson_with_bad_lines_is_rejected_whole(self) -> None:
        """A batch with malformed lines 3 and 7 is a 400 naming both lines (1-based), and nothing is enqueued."""
        lines = [json.dumps({"i": i}).encode() for i in range(1, 11)]
        lines[2] = b'{"i": 3'  # line 3: truncated object
        lines[6] = b"not json at all"  # line 7
        resp = self.relayd.post("/batch", b"\n".join(lines) + b"\n", {"Content-Type": "application/x-ndjson"})
        self.assert_problem(resp, 400, "3", "7")
        self.assertEqual(self.redis.llen("batch"), 0)
        self.assert_only_sentinel_follows("/batch", "batch", 0)

    def test_ndjson_schema_violations_name_lines(self) -> None:
        """On a schema route, lines 3 and 7 violating the schema reject the whole batch with both line numbers."""
        lines = [{"key": str(uuid.uuid4()), "value": i} for i in range(1, 11)]
        lines[2]["value"] = 0
        lines[6]["key"] = "nope"
        resp = self.relayd.post("/increments", ndjson(lines), {"Content-Type": "application/x-ndjson"})
        self.assert_problem(resp, 400, "3", "7")
        self.assert_only_sentinel_follows("/increments", "increments", 0)

    # 4 ----------------------------------------------------------------------

    def test_unknown_route_is_404(self) -> None:
        """POST to a path no route has is a 404 problem."""
        self.assert_problem(self.relayd.post("/nope", b'{"a": 1}'), 404)

    def test_get_on_route_is_405(self) -> None:
        """GET on an ingest route is a 405 problem and enqueues nothing."""
        self.assert_problem(self.relayd.request("GET", "/leads"), 405)
        self.assert_only_sentinel_follows("/leads", "leads", 0)

    def test_405_names_allowed_method(self) -> None:
        """A 405 carries ``Allow: POST`` (RFC 9110 section 15.5.6 requires an Allow header)."""
        status, headers, _ = self.relayd.request("GET", "/leads")
        self.assertEqual(status, 405)
        self.assertIn("POST", headers.get("allow", ""), headers)

    def test_max_body_boundary(self) -> None:
        """With max_body = "1KiB" a 1024-byte body is accepted and a 1025-byte body is a 413 problem."""
        prefix, suffix = b'{"p": "', b'"}'
        exact = prefix + b"x" * (1024 - len(prefix) - len(suffix)) + suffix
        self.assertEqual(len(exact), 1024)
        self.assert_2xx(self.relayd.post("/small", exact))
        over = prefix + b"x" * (1025 - len(prefix) - len(suffix)) + suffix
        self.assert_problem(self.relayd.post("/small", over), 413)
        self.wait_llen("small", 1)
        self.assertEqual(self.redis.llen("small"), 1)
        self.assert_only_sentinel_follows("/small", "small", 1)

    def test_413_is_sent_before_the_body(self) -> None:
        """A Content-Length over max_body gets a 413 problem while the client has sent no body byte."""
        with socket.create_connection(("127.0.0.1", self.relayd.ingest_port), timeout=5.0) as s:
            s.sendall(
                b"POST /small HTTP/1.1\r\nHost: relayd\r\nContent-Type: application/json\r\n"
                b"Content-Length: 10485760\r\n\r\n"
            )
            resp = http.client.HTTPResponse(s, method="POST")
            try:
                resp.begin()
            except TimeoutError:
                self.fail("no response within 5 s: relayd waits for the 10 MiB body before answering 413")
            body = resp.read()
            headers = {k.lower(): v for k, v in resp.getheaders()}
        self.assert_problem((resp.status, headers, body), 413)
        self.assert_only_sentinel_follows("/small", "small", 0)

    def test_xml_on_schema_route_is_415(self) -> None:
        """Content-Type application/xml on a route with a JSON schema is a 415 problem; nothing enqueued."""
        resp = self.relayd.post("/increments", b"<increment/>", {"Content-Type": "application/xml"})
        self.assert_problem(resp, 415)
        self.assert_only_sentinel_follows("/increments", "increments", 0)

    # 6 ----------------------------------------------------------------------

    def test_healthz_and_readyz(self) -> None:
        """With Redis up, /healthz and /readyz both answer 200."""
        self.assertEqual(self.relayd.get_admin("/healthz")[0], 200)
        self.assertEqual(self.relayd.get_admin("/readyz")[0], 200)

    def test_metrics_count_ingested_messages(self) -> None:
        """/metrics is Prometheus text whose ingested counter for a route equals the messages acknowledged there."""
        from prometheus_client.parser import text_string_to_metric_families

        for i in range(7):
            self.assert_2xx(self.relayd.post("/metered", json.dumps({"i": i}).encode()))
        batch = ndjson({"b": i} for i in range(5))
        self.assert_2xx(self.relayd.post("/metered", batch, {"Content-Type": "application/x-ndjson"}))
        # Rejected requests are not ingested messages.
        self.assertEqual(self.relayd.post("/metered", b"{bad")[0], 400)
        expected = 12

        def ingested() -> float:
            status, headers, body = self.relayd.get_admin("/metrics")
            self.assertEqual(status, 200)
            self.assertTrue(headers.get("content-type", "").startswith("text/plain"), headers)
            total, found = 0.0, False
            for family in text_string_to_metric_families(body.decode()):
                if family.type == "counter" and "ingested" in family.name:
                    for sample in family.samples:
                        is_count = sample.name.endswith("_total") or sample.name == family.name
                        if is_count and sample.labels.get("route", "/metered") == "/metered":
                            total += sample.value
                            found = True
            self.assertTrue(found, f"no ingested counter in /metrics:\n{body.decode()[:3000]}")
            return total

        try:
            wait_for(lambda: ingested() >= expected, 30.0, "the ingested counter to reach 12")
        except AssertionError as e:
            raise AssertionError(f"{e}; last value {ingested()}") from None
        self.assertEqual(ingested(), expected)


class ReadinessTests(RelayTestCase):
    """Readiness and overload follow whether messages can be taken.

    The contract says /readyz is 200 "only when workers listen and Redis or
    the spool can take messages".  With the default 1 GiB spool, 200 while
    Redis is down is allowed, so these tests configure a spool of one byte,
    which cannot take any message: once Redis is gone, neither can.
    """

    def setUp(self) -> None:
        self.redis = RedisServer(self)
        self.relayd = RelaydProcess(
            self,
            routes=[{"path": "/leads", "list": "leads"}],
            redis_url=self.redis.url,
            spool={"max_bytes": "1B"},
        )

    def wait_readyz(self, status: int, timeout: float) -> None:
        """Poll /readyz until it answers `status`; the failure shows the last answer."""
        last: list = []

        def check() -> bool:
            resp = self.relayd.get_admin("/readyz", timeout=5.0)
            last[:] = [resp[0], resp[2][:300]]
            return resp[0] == status

        try:
            wait_for(check, timeout, f"/readyz to answer {status}")
        except AssertionError as e:
            raise AssertionError(f"{e}; last answer: {last}") from None

    def test_readyz_503_when_redis_killed(self) -> None:
        """/readyz is 200 with Redis up and turns 503 once Redis is SIGKILLed (spool unable to take messages); /healthz stays 200."""
        self.assertEqual(self.relayd.get_admin("/readyz")[0], 200)
        self.redis.kill()
        self.wait_readyz(503, 15.0)
        self.assertEqual(self.relayd.get_admin("/healthz")[0], 200)

    def test_stored_post_without_redis_or_spool_is_503(self) -> None:
        """With Redis killed and no spool room, an ack = "stored" POST gets a timely 503 problem with Retry-After, not a hang."""
        self.redis.kill()
        started = time.monotonic()
        try:
            resp = self.relayd.post("/leads", b'{"a": 1}', timeout=20.0)
        except TimeoutError:
            self.fail(f"no response after {time.monotonic() - started:.1f}s (expected 503 with Retry-After)")
        self.assert_problem(resp, 503)
        self.assertIn("retry-after", resp[1], resp[1])

    def test_messages_flow_after_redis_restart(self) -> None:
        """After Redis is killed and restarted on the same port, /readyz is 200 and a stored POST lands in Redis."""
        self.redis.kill()
        self.redis.restart()
        self.wait_readyz(200, 20.0)
        doc = self.assert_2xx(self.relayd.post("/leads", b'{"after": "restart"}', timeout=20.0))
        self.wait_llen("leads", 1)
        self.assertEqual(self.envelopes("leads")[0]["id"], doc["id"])


class GracefulStopTests(RelayTestCase):
    """SIGTERM loses nothing that was acknowledged."""

    N = 2000
    PAUSED_FROM = 500  # messages 500..1999 are posted while Redis is SIGSTOPped

    def test_sigterm_with_accepted_ack_loses_nothing(self) -> None:
        """With ack = "accepted", messages held in memory while Redis is stopped all reach Redis after SIGTERM; exit 0."""
        self.redis = RedisServer(self)
        self.relayd = RelaydProcess(
            self,
            routes=[{"path": "/events", "list": "events", "ack": "accepted"}],
            redis_url=self.redis.url,
        )
        oracle = Oracle(route="/events")
        for i in range(self.N):
            if i == self.PAUSED_FROM:
                self.redis.pause()
            resp = oracle.post(self.relayd, "/events")
            self.assertIsNotNone(resp, f"message {i}: transport error")
            assert resp is not None
            self.assertTrue(200 <= resp[0] < 300, f"message {i}: {resp[0]} {resp[2][:300]!r}")
        self.assertEqual(len(oracle.acked), self.N)

        self.relayd.signal(signal.SIGTERM)
        # Let relayd act on SIGTERM while Redis is still stopped: it closes the
        # ingest port first.  Not asserted (that is a different promise).
        try:
            wait_for(lambda: not port_accepts(self.relayd.ingest_port), 5.0, "ingest port to close")
        except AssertionError:
            pass
        self.redis.resume()
        code = self.relayd.wait(60.0)
        self.assertEqual(code, 0, f"exit status {code}; log tail:\n{self.relayd.log_tail()}")
        report = oracle.assert_ok(self, self.redis, "events", max_duplicates=self.N - self.PAUSED_FROM)
        print(f"graceful stop: {report.items} items, {report.duplicates} duplicate(s)")

    def test_sigterm_with_redis_down_spools_memory(self) -> None:
        """ack = "accepted" with Redis dead: SIGTERM spools what is in memory (exit 0); after restarts it all reaches Redis."""
        self.redis = RedisServer(self)
        self.relayd = RelaydProcess(
            self,
            routes=[{"path": "/events", "list": "events", "ack": "accepted"}],
            redis_url=self.redis.url,
        )
        oracle = Oracle(route="/events")
        for _ in range(100):
            oracle.post(self.relayd, "/events")
        self.assertEqual(len(oracle.acked), 100, oracle.rejected[:3] or oracle.errors[:3])
        wait_for(lambda: oracle.all_acknowledged_in(self.redis, "events"), ARRIVAL_TIMEOUT, "first 100 in Redis")
        # This Redis keeps nothing across a kill (no AOF/RDB): check and drain
        # the first 100 now, then judge only what was posted while it was down.
        oracle.assert_ok(self, self.redis, "events", max_duplicates=0)
        oracle = Oracle(route="/events")
        self.redis.kill()
        for i in range(300):
            resp = oracle.post(self.relayd, "/events", timeout=15.0)
            if resp is None or not 200 <= resp[0] < 300:
                self.fail(
                    f"message {i} after Redis died (ack = accepted, 1 GiB spool): expected 2xx, "
                    f"got {resp[0] if resp else oracle.errors[-1]} {resp[2][:300] if resp else b''!r}"
                )
        code = self.relayd.terminate(60.0)
        self.assertEqual(code, 0, f"exit status {code}; log tail:\n{self.relayd.log_tail()}")
        self.redis.restart()
        self.relayd.start()
        wait_for(lambda: oracle.all_acknowledged_in(self.redis, "events"), 20.0, "spooled messages in Redis")
        report = oracle.assert_ok(self, self.redis, "events", max_duplicates=300)
        print(f"graceful stop, redis down: {report.items} items, {report.duplicates} dup(s)")


class Poster(threading.Thread):
    """Posts oracle messages back to back until stopped (or `limit` is reached)."""

    def __init__(self, oracle: Oracle, relayd: RelaydProcess, path: str, keep_alive: bool = True) -> None:
        super().__init__(daemon=True)
        self.oracle, self.relayd, self.path, self.keep_alive = oracle, relayd, path, keep_alive
        self.stopping = threading.Event()

    def run(self) -> None:
        """Post until `stop`; the oracle records acks, rejections and transport errors."""
        while not self.stopping.is_set():
            self.oracle.post(self.relayd, self.path, keep_alive=self.keep_alive, timeout=10.0)

    def stop(self) -> None:
        """Stop and join."""
        self.stopping.set()
        self.join(30.0)


class CrashTests(RelayTestCase):
    """SIGKILL loses nothing acknowledged with ack = "stored" (at-least-once: duplicates allowed)."""

    def setUp(self) -> None:
        self.redis = RedisServer(self)
        self.relayd = RelaydProcess(self, routes=[{"path": "/leads", "list": "leads"}], redis_url=self.redis.url)

    def test_sigkill_under_load(self) -> None:
        """relayd SIGKILLed while a client posts: after a restart every acknowledged message is in Redis."""
        oracle = Oracle(route="/leads")
        poster = Poster(oracle, self.relayd, "/leads")
        self.addCleanup(poster.stop)
        poster.start()
        wait_for(lambda: len(oracle.acked) >= 300, 30.0, "300 acknowledged messages")
        self.relayd.kill()
        poster.stop()
        self.relayd.start()
        wait_for(lambda: oracle.all_acknowledged_in(self.redis, "leads"), ARRIVAL_TIMEOUT, "acknowledged messages")
        report = oracle.assert_ok(self, self.redis, "leads", max_duplicates=1000)
        print(f"sigkill under load: {len(oracle.acked)} acked, {report.items} items, {report.duplicates} dup(s)")

    def test_spooled_messages_survive_sigkill(self) -> None:
        """With Redis down, stored POSTs are acknowledged from the spool; after SIGKILL and restarts they reach Redis."""
        self.redis.kill()
        oracle = Oracle(route="/leads")
        for i in range(50):
            resp = oracle.post(self.relayd, "/leads", timeout=15.0)
            if resp is None or not 200 <= resp[0] < 300:
                self.fail(
                    f"message {i} with Redis down and an empty 1 GiB spool: expected 2xx (fsynced in the spool), "
                    f"got {resp[0] if resp else oracle.errors[-1]} {resp[2][:300] if resp else b''!r}"
                )
        self.relayd.kill()
        self.redis.restart()
        self.relayd.start()
        wait_for(lambda: oracle.all_acknowledged_in(self.redis, "leads"), 20.0, "spooled messages to reach Redis")
        report = oracle.assert_ok(self, self.redis, "leads", max_duplicates=50)
        print(f"spool after sigkill: {report.items} items, {report.duplicates} dup(s)")


class StoredAckUnderHungRedisTests(RelayTestCase):
    """A stored 2xx is a promise that survives SIGKILL, even while Redis hangs."""

    def test_stored_acks_survive_sigkill_while_redis_hangs(self) -> None:
        """Redis SIGSTOPped; concurrent stored POSTs; relayd SIGKILLed once every client has an answer;
        after restarts every message acknowledged with 2xx is in Redis."""
        self.redis = RedisServer(self)
        self.relayd = RelaydProcess(self, routes=[{"path": "/leads", "list": "leads"}], redis_url=self.redis.url)
        oracle = Oracle(route="/leads")
        for _ in range(3):
            self.assert_2xx(self.relayd.post("/leads", b'{"warm": "up"}'))  # not oracle messages: drained below
        self.wait_llen("leads", 3)
        self.redis.drain("leads")

        self.redis.pause()
        answered: list = []
        threads = []
        for _ in range(8):
            t = threading.Thread(
                target=lambda: answered.append(oracle.post(self.relayd, "/leads", keep_alive=False, timeout=25.0)),
                daemon=True,
            )
            t.start()
            threads.append(t)
        wait_for(lambda: len(answered) == 8, 30.0, "every stored POST to get an answer (2xx or 503)")
        for t in threads:
            t.join(1.0)
        statuses = sorted(r[0] if r else None for r in answered)
        for status in statuses:
            self.assertTrue(status is not None and (200 <= status < 300 or status == 503), statuses)

        self.relayd.kill()
        self.redis.resume()
        self.relayd.start()
        wait_for(lambda: self.relayd.get_admin("/readyz")[0] == 200, 20.0, "relayd ready after restart")
        # A marker posted now: once it is in Redis, the restarted relayd has
        # had its chance to push whatever it recovered (FIFO per worker).
        marker = oracle.post(self.relayd, "/leads", after="restart")
        self.assertTrue(marker is not None and 200 <= marker[0] < 300, marker)
        wait_for(lambda: oracle.all_acknowledged_in(self.redis, "leads"), 20.0, "acknowledged messages in Redis")
        answered_503 = {cid for cid, status, _ in oracle.rejected if status == 503}
        present = oracle.cids_in(self.redis, "leads")
        with self.subTest("every 2xx-acknowledged message is in Redis"):
            report = oracle.check(self.redis, "leads")
            self.assertEqual(report.problems(), [])
            # Bound: each message at most twice (an LPUSH Redis ran after SIGCONT
            # plus its replay from the spool).
            self.assertLessEqual(report.duplicates, 8)
            print(f"hung redis: statuses {statuses}; {report.items} items, {report.duplicates} dup(s)")
        with self.subTest("a message answered 503 is not enqueued (contract: errors enqueue nothing)"):
            self.assertEqual(
                sorted(answered_503 & present),
                [],
                f"{len(answered_503 & present)} of {len(answered_503)} messages answered 503 were pushed to Redis; "
                f"first 503: {oracle.rejected[0][2] if oracle.rejected else None!r}",
            )


class DaemonTests(unittest.TestCase):
    """``twistd relayd --config PATH`` (no -n) daemonizes as twistd does."""

    def test_daemonizes_and_stops_on_sigterm(self) -> None:
        """Without -n the launcher exits 0, the daemon writes its pidfile, serves, and exits on SIGTERM removing it."""
        import os
        import subprocess

        from tests.harness import REPO_ROOT, twistd_command

        redis = RedisServer(self)
        relayd = RelaydProcess(
            self, routes=[{"path": "/leads", "list": "leads"}], redis_url=redis.url, wait_ready=False
        )
        relayd.kill()  # only its config, ports and temp dir are used here
        pidfile = os.path.join(relayd.dir, "relayd.pid")
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        argv = [
            *twistd_command(),
            f"--pidfile={pidfile}",
            f"--logfile={os.path.join(relayd.dir, 'twistd.log')}",
            "relayd",
            "--config",
            relayd.config_path,
        ]
        pid_holder: list = []

        def kill_daemon() -> None:
            if pid_holder:
                try:
                    os.kill(pid_holder[0], signal.SIGKILL)
                except ProcessLookupError:
                    pass

        self.addCleanup(kill_daemon)
        launcher = subprocess.run(
            argv, cwd=relayd.dir, env=env, capture_output=True, timeout=30, stdin=subprocess.DEVNULL
        )
        self.assertEqual(launcher.returncode, 0, launcher.stderr[-2000:])

        def read_pid() -> int:
            with open(pidfile) as f:
                return int(f.read().strip())

        pid_holder.append(wait_for(read_pid, 15.0, "the pidfile"))
        try:
            wait_for(lambda: relayd.get_admin("/readyz", timeout=2.0)[0] == 200, 20.0, "the daemon's /readyz 200")
        except AssertionError as e:
            raise AssertionError(f"{e}; log:\n{relayd.log_tail()}") from None
        self.assert_2xx_json(relayd.post("/leads", b'{"daemon": true}'))
        os.kill(pid_holder[0], signal.SIGTERM)

        def gone() -> bool:
            try:
                os.kill(pid_holder[0], 0)
            except ProcessLookupError:
                return True
            return False

        wait_for(gone, 30.0, "the daemon to exit after SIGTERM")
        self.assertFalse(os.path.exists(pidfile), "pidfile left behind")
        self.assertEqual(redis.llen("leads"), 1)
        self.assertFalse(port_accepts(relayd.ingest_port))

    def assert_2xx_json(self, resp: Response) -> None:
        """2xx with status OK."""
        self.assertTrue(200 <= resp[0] < 300, resp)
        self.assertEqual(json_body(resp)["status"], "OK")


class ReloadTests(RelayTestCase):
    """SIGHUP reloads the config without dropping the listening socket."""

    def test_sighup_adds_route_without_refusing_connections(self) -> None:
        """After SIGHUP a newly configured route works, while clients on new connections never saw a refusal or reset."""
        self.redis = RedisServer(self)
        route_a = {"path": "/a", "list": "a"}
        self.relayd = RelaydProcess(self, routes=[route_a], redis_url=self.redis.url)
        oracle = Oracle(route="/a")
        poster = Poster(oracle, self.relayd, "/a", keep_alive=False)
        self.addCleanup(poster.stop)
        poster.start()
        wait_for(lambda: len(oracle.acked) >= 50, 20.0, "50 acknowledged messages before SIGHUP")

        self.relayd.rewrite_config([route_a, {"path": "/b", "list": "b"}])
        self.relayd.signal(signal.SIGHUP)

        def b_works() -> bool:
            resp = self.relayd.post("/b", b'{"on": "b"}', keep_alive=False, timeout=5.0)
            return 200 <= resp[0] < 300

        try:
            wait_for(b_works, 10.0, "POST /b to succeed after SIGHUP")
        except AssertionError as e:
            alive = self.relayd.alive()
            raise AssertionError(f"{e}; relayd alive: {alive}; log tail:\n{self.relayd.log_tail()}") from None
        acked_after = len(oracle.acked) + 50
        wait_for(lambda: len(oracle.acked) >= acked_after, 20.0, "50 more acknowledged messages on /a")
        poster.stop()

        self.assertTrue(self.relayd.alive())
        self.assertEqual(oracle.errors, [], "connections refused or reset around SIGHUP")
        self.assertEqual(oracle.rejected, [], "non-2xx answers on /a around SIGHUP")
        self.wait_llen("b", 1)
        self.assertEqual(self.envelopes("b")[0]["body"], {"on": "b"})
        wait_for(lambda: oracle.all_acknowledged_in(self.redis, "a"), ARRIVAL_TIMEOUT, "messages on /a")
        oracle.assert_ok(self, self.redis, "a")


class OptionsAndWorkersTests(RelayTestCase):
    """Command-line overrides and multi-worker aggregation."""

    def test_listen_option_overrides_config(self) -> None:
        """``--listen ENDPOINT`` replaces [server] listen: ingest answers on the override port only."""
        from tests.harness import free_port

        self.redis = RedisServer(self)
        override = free_port()
        self.relayd = RelaydProcess(
            self,
            routes=[{"path": "/leads", "list": "leads"}],
            redis_url=self.redis.url,
            extra_args=["--listen", f"tcp:{override}:interface=127.0.0.1"],
        )
        configured = self.relayd.ingest_port
        self.relayd.ingest_port = override
        self.assert_2xx(self.relayd.post("/leads", b'{"via": "override"}'))
        self.assertFalse(port_accepts(configured), "the configured listen port is bound despite --listen")

    def test_two_workers_unique_ids_and_aggregated_metrics(self) -> None:
        """With workers = 2, ids stay unique and /metrics counts ingested messages over all workers."""
        from prometheus_client.parser import text_string_to_metric_families

        self.redis = RedisServer(self)
        self.relayd = RelaydProcess(
            self, routes=[{"path": "/w", "list": "w"}], redis_url=self.redis.url, server={"workers": 2}
        )
        oracle = Oracle(route="/w")
        for _ in range(200):
            resp = oracle.post(self.relayd, "/w", keep_alive=False)  # new connections spread over workers
            self.assertIsNotNone(resp)
        self.assertEqual(len(oracle.acked), 200, oracle.rejected[:3])
        self.assertEqual(len(set(oracle.acked.values())), 200, "ids collide across workers")

        def ingested() -> float:
            body = self.relayd.get_admin("/metrics")[2].decode()
            return sum(
                sample.value
                for family in text_string_to_metric_families(body)
                if family.type == "counter" and "ingested" in family.name
                for sample in family.samples
                if sample.name.endswith("_total") and sample.labels.get("route", "/w") == "/w"
            )

        last: list = []
        try:
            wait_for(lambda: last.append(ingested()) or last[-1] == 200, 10.0, "ingested counter == 200")
        except AssertionError as e:
            raise AssertionError(f"{e}; last value {last[-1:]}") from None
        wait_for(lambda: oracle.all_acknowledged_in(self.redis, "w"), ARRIVAL_TIMEOUT, "all messages in Redis")
        oracle.assert_ok(self, self.redis, "w")


class BadConfigTests(unittest.TestCase):
    """A bad config ends twistd quickly, non-zero, with one line naming the key, before binding."""

    def run_bad_config(self, body: str, files: dict | None = None) -> tuple[int, str, RelaydProcess]:
        """Start relayd on a config whose [server] binds free ports plus `body`; return (code, stderr, process)."""
        from tests.harness import free_port

        ingest, admin = free_port(), free_port()
        server = f'[server]\nlisten = "tcp:{ingest}:interface=127.0.0.1"\nadmin = "tcp:{admin}:interface=127.0.0.1"\n'
        relayd = RelaydProcess(
            self,
            config_text=server + body,
            files=files,
            wait_ready=False,
            ingest_port=ingest,
            admin_port=admin,
        )
        assert relayd.proc is not None
        deadline = time.monotonic() + BAD_CONFIG_EXIT_TIMEOUT
        bound = False
        while relayd.proc.poll() is None and time.monotonic() < deadline:
            bound = bound or port_accepts(ingest)
            time.sleep(0.005)  # poll interval only; nothing is asserted on timing
        if relayd.proc.poll() is None:
            relayd.kill()
            self.fail(f"relayd still running {BAD_CONFIG_EXIT_TIMEOUT:.0f}s after start; log:\n{relayd.log_tail()}")
        code = relayd.wait()
        self.assertFalse(bound, "the ingest port accepted a connection")
        self.assertNotIn(f"starting on {ingest}", relayd.log_text(), "the ingest port was bound")
        return code, relayd.stderr_text(), relayd

    def assert_one_line_naming(self, code: int, stderr: str, relayd: RelaydProcess, *words: str) -> None:
        """Exit status non-zero; stderr is one line naming each of `words`."""
        self.assertNotEqual(code, 0, f"log:\n{relayd.log_tail()}")
        self.assertNotIn("Traceback", stderr)
        lines = [line for line in stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, f"stderr should be one line, got {len(lines)}:\n{stderr[-3000:]}")
        for word in words:
            self.assertIn(word, lines[0])
        print(f"bad config -> exit {code}, stderr: {lines[0]}")

    ROUTE = '[redis]\nurl = "redis://127.0.0.1:1/0"\n\n[[route]]\npath = "/leads"\nlist = "leads"\n'

    def test_unknown_key(self) -> None:
        """An unknown key in [server] is rejected with a line naming it."""
        code, err, proc = self.run_bad_config("listen_backlog = 5\n" + self.ROUTE)
        self.assert_one_line_naming(code, err, proc, "listen_backlog")

    def test_unknown_route_key(self) -> None:
        """An unknown key in a [[route]] table is rejected with a line naming it."""
        code, err, proc = self.run_bad_config(self.ROUTE + 'acknowledge = "stored"\n')
        self.assert_one_line_naming(code, err, proc, "acknowledge")

    def test_wrong_type(self) -> None:
        """redis.url given as an integer is rejected with a line naming the key."""
        body = '\n[redis]\nurl = 6379\n\n[[route]]\npath = "/leads"\nlist = "leads"\n'
        code, err, proc = self.run_bad_config(body)
        self.assert_one_line_naming(code, err, proc, "url")

    def test_wrong_type_in_route(self) -> None:
        """A route's max_body given as a boolean is rejected with a line naming the key."""
        code, err, proc = self.run_bad_config(self.ROUTE + "max_body = true\n")
        self.assert_one_line_naming(code, err, proc, "max_body")

    def test_unwritable_spool_dir(self) -> None:
        """A spool dir that cannot be created (its parent is a regular file) is rejected with a line naming the key."""
        body = self.ROUTE + '\n[spool]\ndir = "not-a-dir/spool"\n'
        code, err, proc = self.run_bad_config(body, files={"not-a-dir": "a plain file\n"})
        self.assert_one_line_naming(code, err, proc, "spool")

    def test_missing_schema_file(self) -> None:
        """A route whose schema file does not exist is rejected with a line naming the schema key."""
        code, err, proc = self.run_bad_config(self.ROUTE + 'schema = "schemas/missing.json"\n')
        self.assert_one_line_naming(code, err, proc, "schema")


if __name__ == "__main__":  # pragma: no cover
    unittest.main()
