"""Request/reply through Redis: real relayd processes, a real Redis, and the example worker.

test-case-name: tests.test_reply
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import unittest
from typing import Any, Dict, List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.reply.protocol import MalformedReply, _is_token, parse_reply
from tests.fault_tools import metric_values
from tests.harness import REPO_ROOT, RedisServer, RelaydProcess, wait_for

ROUTE = {"path": "/quote", "list": "quote-requests", "reply_timeout": "3s"}
#: Seconds for relayd's reply readers or a worker to start: generous, a loaded CI box is slow.
READY_WAIT = 30.0


def ask(port: int, body: Dict[str, Any], timeout: float = 30.0) -> Tuple[int, Dict[str, str], Any]:
    """POST /quote on a fresh connection: status, headers, parsed body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/quote", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(raw) if raw else None
    finally:
        conn.close()


class ReplyProtocolTests(unittest.TestCase):
    """What a reply must look like (pure)."""

    def test_valid_reply(self) -> None:
        """Status, headers (hop-by-hop and Content-Length dropped) and a JSON body."""
        reply = parse_reply(
            json.dumps(
                {"id": "r1", "status": 201, "headers": {"X-A": "1", "Connection": "close", "Content-Length": "9"},
                 "body": {"ok": True}}
            ).encode()
        )
        self.assertEqual((reply.request_id, reply.status, reply.body), ("r1", 201, b'{"ok":true}'))
        self.assertEqual(dict(reply.headers), {b"X-A": b"1", b"Content-Type": b"application/json"})

    def test_string_body_and_defaults(self) -> None:
        """A string body is sent as text; status defaults to 200."""
        reply = parse_reply(b'{"id": "r2", "body": "hello"}')
        self.assertEqual((reply.status, reply.body), (200, b"hello"))
        self.assertIn((b"Content-Type", b"text/plain; charset=utf-8"), reply.headers)

    def test_malformed(self) -> None:
        """Not JSON, no id, a status outside 200..599, non-string or invalid headers: MalformedReply."""
        cases = [
            (b"nope", None),
            (b"[1]", None),
            (b'{"status": 200}', None),
            (b'{"id": "x", "status": 99}', "x"),
            (b'{"id": "x", "status": "200"}', "x"),
            (b'{"id": "x", "headers": {"A": 1}}', "x"),
            (b'{"id": "x", "headers": {"A": "b\\r\\nEvil: 1"}}', "x"),
            (b'{"id": "x", "headers": ["A"]}', "x"),
        ]
        for raw, rid in cases:
            with self.assertRaises(MalformedReply) as caught:
                parse_reply(raw)
            self.assertEqual(caught.exception.request_id, rid, raw)


class HeaderNameTests(unittest.TestCase):
    """Reply header names must be RFC 9110 tokens (the check is a regex now; this pins it to the grammar)."""

    TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.sampled_from(sorted(TCHAR) + list(" \t\r\n:;,\"()/<=>?@[]{}\x00\x7fé\u0100")), max_size=12)
           | st.text(max_size=12))
    def test_token_check_matches_the_grammar(self, name: str) -> None:
        """A non-empty string of tchars is a token; anything else (empty, CR/LF, separators, non-ASCII) is not."""
        self.assertEqual(_is_token(name), bool(name) and all(c in self.TCHAR for c in name))


class RequestReplyTests(unittest.TestCase):
    """The whole path: HTTP -> relayd -> Redis -> worker -> reply list -> the right HTTP request."""

    def relayd(self, redis: RedisServer, route: Dict[str, Any] = ROUTE, workers: int = 1) -> RelaydProcess:
        """A relayd whose reply readers are all reading.

        /readyz does not wait for them (the contract's readiness is "can store"),
        and a reply route answers 503 until its reader is connected; each reader
        registers its list when it starts, so wait for every worker's entry.
        """
        relayd = RelaydProcess(self, routes=[route], redis_url=redis.url, server={"workers": workers})
        wait_for(lambda: redis.command("ZCARD", "relayd:reply-lists") == workers, READY_WAIT, "the reply readers to start")
        return relayd

    def worker(self, redis: RedisServer, *args: str) -> subprocess.Popen:
        """Start examples/reply_worker.py; return once it waits in BRPOP (stopped at cleanup).

        Python and redis-py take seconds to start on a loaded box: a request
        asked meanwhile would sit in the list past a short reply_timeout, or
        be taken by the worker of an earlier step.  The worker's connection
        is named (redis-py's ``client_name`` URL option), so CLIENT LIST shows
        when it is blocked on the request list.
        """
        self._workers = getattr(self, "_workers", 0) + 1
        name = f"test-reply-worker-{self._workers}"
        proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO_ROOT, "examples", "reply_worker.py"), "--redis",
             f"{redis.url}?client_name={name}", "--list", "quote-requests", *args],
        )  # fmt: skip
        self.addCleanup(lambda: (proc.kill(), proc.wait()))

        def waiting() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"reply worker exited with {proc.returncode} before serving")
            clients = redis.command("CLIENT", "LIST").decode().splitlines()
            return any(f" name={name} " in line and " cmd=brpop " in line for line in clients)

        wait_for(waiting, READY_WAIT, f"reply worker {name} to wait for requests")
        return proc

    def test_many_concurrent_requests_each_get_their_own_reply(self) -> None:
        """workers = 2 and an echo worker: 1,000 requests from 100 concurrent clients each get the
        reply to their own body, whichever relayd process holds them; no reply crosses."""
        redis = RedisServer(self)
        relayd = self.relayd(redis, workers=2)
        self.worker(redis)
        bad: List[Any] = []

        def client(c: int) -> None:
            for i in range(10):
                status, headers, body = ask(relayd.ingest_port, {"client": c, "i": i})
                if status != 200 or body.get("echo") != {"client": c, "i": i} or "x-worker" not in headers:
                    bad.append((c, i, status, body))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(bad[:5], [], f"{len(bad)} requests got no or someone else's reply")
        values = metric_values(relayd)
        self.assertEqual(values.get("relayd_replies_total"), 1000.0)
        self.assertEqual(values.get("relayd_reply_waiting"), 0.0)

    def test_slow_worker_times_out_and_its_late_reply_is_dropped(self) -> None:
        """A worker slower than reply_timeout: 504 problem; its late reply is counted and dropped,
        and the next request (answered in time) still works."""
        redis = RedisServer(self)
        # ROUTE's 3 s, not less: the in-time request below is a round trip through four processes on
        # a loaded box; the slow worker is 1.5 s slower than that.
        relayd = self.relayd(redis)
        slow = self.worker(redis, "--mode", "slow", "--delay", "4.5")
        status, headers, body = ask(relayd.ingest_port, {"n": 1})
        self.assertEqual((status, headers["content-type"]), (504, "application/problem+json"))
        self.assertEqual(body["status"], 504)
        wait_for(lambda: metric_values(relayd).get('relayd_replies_total') == 1.0, READY_WAIT, "the late reply")
        slow.kill()
        slow.wait()
        self.worker(redis)
        status, _, body = ask(relayd.ingest_port, {"n": 2})
        self.assertEqual((status, body["echo"]), (200, {"n": 2}))
        text = relayd.get_admin("/metrics")[2].decode()
        self.assertIn('relayd_replies_total{outcome="late"} 1.0', text)
        self.assertIn("relayd_reply_timeouts_total 1.0", text)

    def test_worker_that_dies_and_malformed_replies(self) -> None:
        """A worker that vanishes mid-request: 504, nothing left waiting.  A malformed reply:
        counted, 502 for the request it names."""
        redis = RedisServer(self)
        relayd = self.relayd(redis)  # ROUTE's 3 s: the malformed reply must come back within it
        self.worker(redis, "--mode", "vanish")
        self.assertEqual(ask(relayd.ingest_port, {"n": 1})[0], 504)
        self.assertEqual(metric_values(relayd).get("relayd_reply_waiting"), 0.0)
        self.worker(redis, "--mode", "malformed")
        status, _, body = ask(relayd.ingest_port, {"n": 2})
        self.assertEqual((status, body["type"].rsplit("/", 1)[-1]), (502, "bad-reply"))
        # Garbage without an id in the list: counted, and the reader keeps going.
        for item in (b"not json", b'{"no": "id"}'):
            redis.command("LPUSH", relayd_reply_list(redis), item)
        wait_for(
            lambda: "relayd_replies_total{outcome=\"malformed\"} 3.0" in relayd.get_admin("/metrics")[2].decode(),
            READY_WAIT,
            "three malformed replies counted",
        )
        self.assertTrue(relayd.alive())

    def test_client_disconnect_frees_the_waiter(self) -> None:
        """A client that leaves while waiting frees its entry at once, not at the timeout, and its
        request counts as finished: a graceful stop right after does not wait for it (it used to:
        every disconnect kept the stop waiting for `shutdown_timeout` and logging "still open")."""
        redis = RedisServer(self)
        # A reply_timeout far beyond the wait below: freed within 60 s can only be the disconnect.
        relayd = RelaydProcess(self, routes=[{**ROUTE, "reply_timeout": "300s"}], redis_url=redis.url,
                               server={"shutdown_timeout": 2.0})
        wait_for(lambda: redis.command("ZCARD", "relayd:reply-lists") == 1, READY_WAIT, "the reply reader to start")
        s = socket.create_connection(("127.0.0.1", relayd.ingest_port))
        body = b'{"n": 1}'
        s.sendall(b"POST /quote HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: metric_values(relayd).get("relayd_reply_waiting") == 1.0, READY_WAIT, "the request to wait")
        s.close()
        wait_for(lambda: metric_values(relayd).get("relayd_reply_waiting") == 0.0, 60.0, "the waiter to be freed")
        self.assertEqual(relayd.terminate(), 0)
        self.assertNotIn("in-flight requests still open", relayd.log_text())

    def test_reader_survives_a_refused_read(self) -> None:
        """Redis refusing the reader's read (WRONGTYPE: the reply list overwritten by a string) is
        logged and retried, not the end of the reader: once the key is a list again, replies flow."""
        redis = RedisServer(self)
        relayd = self.relayd(redis)
        name = redis.command("ZRANGE", "relayd:reply-lists", 0, -1)[0]
        redis.command("SET", name, "not a list")
        wait_for(lambda: "reply reader: reading" in relayd.log_text(), 20.0, "the refused read to be logged")
        redis.command("DEL", name)
        self.worker(redis)
        status, _, body = ask(relayd.ingest_port, {"n": 1})
        self.assertEqual((status, body["echo"]), (200, {"n": 1}))

    def test_redis_outage(self) -> None:
        """Redis down: reply routes answer 503 at once (nothing spooled); Redis back: the reader
        reconnects and requests are answered again."""
        redis = RedisServer(self)
        relayd = self.relayd(redis)
        self.worker(redis)
        self.assertEqual(ask(relayd.ingest_port, {"n": 1})[0], 200)
        redis.stop()
        # "At once": a 503 (nothing to wait for), not the 504 that waiting out reply_timeout would give.
        wait_for(lambda: ask(relayd.ingest_port, {"n": 2})[0] == 503, READY_WAIT, "a 503 while Redis is down")
        status, headers, _ = ask(relayd.ingest_port, {"n": 3})
        self.assertEqual(status, 503)
        self.assertIn("retry-after", headers)
        self.assertEqual(metric_values(relayd).get("relayd_spool_messages", 0.0), 0.0, "nothing spooled")
        redis.restart()
        self.worker(redis)
        wait_for(lambda: ask(relayd.ingest_port, {"n": 4})[0] == 200, READY_WAIT, "replies again after Redis returned")

    def test_lists_of_dead_processes_are_deleted(self) -> None:
        """A reply list whose owner stopped beating long ago is deleted by a live process."""
        redis = RedisServer(self)
        redis.command("LPUSH", "relayd:reply:gone:1:abcd", "orphan reply")
        redis.command("ZADD", "relayd:reply-lists", str(time.time() - 3600), "relayd:reply:gone:1:abcd")
        RelaydProcess(self, routes=[ROUTE], redis_url=redis.url)
        wait_for(lambda: redis.command("EXISTS", "relayd:reply:gone:1:abcd") == 0, READY_WAIT, "the orphan list deleted")


def relayd_reply_list(redis: RedisServer) -> str:
    """The live process's reply list, from the registry."""
    names = redis.command("ZRANGE", "relayd:reply-lists", 0, -1)
    assert len(names) == 1, names
    return names[0].decode()
