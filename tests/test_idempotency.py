"""Idempotency-Key and Relayd-Ack: stored once per key, across processes, outages and restarts.

Real parts: redis-server and ``twistd relayd`` processes (tests/harness.py);
the dedup script's property test runs the real script on a real Redis.

test-case-name: tests.test_idempotency
"""

from __future__ import annotations

import http.client
import json
import struct
import threading
import time
import unittest
from typing import Any, Dict, List, Optional, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from relayd.ingest.idempotency import InvalidIdempotencyKey, RecentKeys, key_digest, key_digester, parse_key
from relayd.ops.metrics import Metrics
from relayd.outbox.dedup import DedupListTarget, decode_bundle, encode_bundle, message_count
from relayd.outbox.writer import RedisWriter
from relayd.redis.client import ResponseError
from tests.fault_tools import metric_values
from tests.harness import RedisError, RedisServer, RelaydProcess, decode_item, wait_for

ROUTE = {"path": "/orders", "list": "orders"}


def post(port: int, body: bytes, key: str | None = None, headers: Dict[str, str] | None = None) -> Tuple[int, Any]:
    """One POST on a fresh connection; (status, parsed JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        h["Idempotency-Key"] = key
    try:
        conn.request("POST", "/orders", body, h)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def bodies_in(redis: RedisServer, key: str = "orders") -> List[Any]:
    """The bodies of the envelopes in a list, oldest first."""
    return [decode_item(item)[1] for item in redis.items(key)]


class HeaderRulesTests(unittest.TestCase):
    """The header's syntax and the in-memory recent keys (pure)."""

    def test_key_syntax(self) -> None:
        """1-255 visible ASCII characters; anything else is a 400 problem."""
        self.assertEqual(parse_key(b"order-42"), b"order-42")
        self.assertEqual(parse_key(b"x" * 255), b"x" * 255)
        for bad in (b"", b"x" * 256, b"a b", b"tab\there", b"ctl\x01", b"caf\xc3\xa9", b"\x7f"):
            with self.assertRaises(InvalidIdempotencyKey):
                parse_key(bad)

    def test_digest_is_route_scoped(self) -> None:
        """The same key on two routes names two markers; the digest does not contain the key."""
        self.assertNotEqual(key_digest(b"/a", b"k"), key_digest(b"/b", b"k"))
        self.assertNotIn(b"secret", key_digest(b"/a", b"secret"))

    def test_recent_keys_expire_and_are_bounded(self) -> None:
        """A remembered key answers until its window ends; the LRU keeps at most max_keys."""
        now = [0.0]
        recent = RecentKeys(lambda: now[0], window=10.0, max_keys=2)
        recent.put(b"a", b"1", now[0])
        self.assertEqual(recent.get(b"a"), b"1")
        now[0] = 10.0
        self.assertIsNone(recent.get(b"a"))
        for k in (b"x", b"y", b"z"):
            recent.put(k, k, now[0])
        self.assertEqual((len(recent), recent.get(b"x")), (2, None))

    def test_recent_keys_file_a_key_by_when_its_request_started(self) -> None:
        """A key whose request started before the current generation is not filed there: that generation would
        answer for it up to (answer time - start) past its marker's expiry."""
        now = [0.0]
        recent = RecentKeys(lambda: now[0], window=10.0, max_keys=100)
        recent.put(b"a", b"1", 0.0)
        now[0] = 6.0
        recent.put(b"b", b"2", 6.0)  # half a window on: a new generation that started at 6
        recent.put(b"late", b"3", 4.0)  # started at 4 (Redis marked it at >= 4), answered now
        now[0] = 13.9
        self.assertEqual(recent.get(b"late"), None)  # filed with "a" (started at 0): dropped by 10
        self.assertEqual(recent.get(b"b"), b"2")

    @given(
        max_keys=st.integers(1, 8),
        ops=st.lists(
            st.tuples(st.sampled_from(["put", "get", "wait"]), st.integers(0, 11), st.sampled_from([0.0, 0.0, 1.0, 4.0])),
            max_size=60,
        ),
    )
    def test_recent_keys_never_answer_late_and_remember_recent_ones(
        self, max_keys: int, ops: List[Tuple[str, int, float]]
    ) -> None:
        """Against a model of when each key's request started (its marker is set no earlier): a key is never
        answered a window or more after that (a late answer would drop a legitimate retry); one put at once
        (no lag between start and put) less than half a window ago, with fewer than max_keys // 2 new keys
        since, is answered; at most max_keys are held."""
        now = [0.0]
        window = 10.0
        recent = RecentKeys(lambda: now[0], window=window, max_keys=max_keys)
        first_put: Dict[bytes, float] = {}  # when the request that stored it started
        lagged: Dict[bytes, bool] = {}
        new_keys: List[bytes] = []  # keys in the order they were first put
        for op, n, lag in ops:
            key = b"k%d" % n
            if op == "wait":
                now[0] += n * 0.75
            elif op == "put":
                since = max(0.0, now[0] - lag)
                if key not in first_put or since >= first_put[key] + window:
                    if recent.get(key) is None:
                        first_put[key] = since
                        lagged[key] = since < now[0]
                        new_keys.append(key)
                        recent.put(key, b"id-%s" % key, since)
            else:
                answer = recent.get(key)
                if answer is not None:
                    self.assertLess(now[0], first_put[key] + window, "answered past the window")
                    self.assertEqual(answer, b"id-%s" % key)
                elif key in first_put and not lagged[key] and now[0] < first_put[key] + window / 2:
                    since = len(new_keys) - 1 - max(i for i, k in enumerate(new_keys) if k == key)
                    self.assertGreaterEqual(since, max(1, max_keys // 2), "forgotten while recent")
            self.assertLessEqual(len(recent), max(max_keys, 1))

    @given(st.binary(max_size=64), st.binary(max_size=40), st.lists(st.binary(max_size=50), max_size=20))
    def test_bundle_round_trip(self, digest: bytes, first_id: bytes, items: List[bytes]) -> None:
        """A bundle decodes to what was encoded, whatever the bytes."""
        digest, first_id = digest[:254], first_id[:255]
        self.assertEqual(decode_bundle(encode_bundle(digest, first_id, items)), (digest, first_id, items))
        self.assertEqual(message_count(encode_bundle(digest, first_id, items)), len(items))

    @given(st.binary(min_size=32, max_size=32), st.binary(min_size=30, max_size=30), st.binary(max_size=300))
    def test_single_bundle_round_trip(self, digest: bytes, first_id: bytes, message: bytes) -> None:
        """The hot path's layout (one message, the usual digest and id sizes) decodes like the general one."""
        bundle = encode_bundle(digest, first_id, [message])
        self.assertEqual(bundle[0], 0xFF)
        self.assertEqual(decode_bundle(bundle), (digest, first_id, [message]))
        self.assertEqual(message_count(bundle), 1)

    def test_digest_length_cannot_read_as_the_single_tag(self) -> None:
        """A general bundle never starts with the single layout's tag byte."""
        with self.assertRaises(ValueError):
            encode_bundle(b"d" * 255, b"id", [b"m"])
        with self.assertRaises(ValueError):
            decode_bundle(b"\xff" + b"d" * 40)  # shorter than a digest and an id

    def test_spools_of_earlier_releases_run_the_same_command(self) -> None:
        """A one-message bundle in the general layout (all a spool written before the single layout holds)
        makes the same command as its single twin."""
        digest, first_id, message = b"a" * 32, b"0" * 30, b'{"m":1}'
        old = b"".join((bytes([32]), digest, bytes([30]), first_id, struct.pack("<II", 1, len(message)), message))
        new = encode_bundle(digest, first_id, [message])
        target = DedupListTarget(b"orders", 5000)
        self.assertNotEqual(old, new)
        self.assertEqual(decode_bundle(old), decode_bundle(new))
        self.assertEqual(target.commands([old, old]), target.commands([new, new]))
        self.assertEqual(target.commands([old, new]), target.commands([new, new]))
        self.assertEqual(target.pushed([old, new], [None, b"x"]), target.pushed([new, new], [None, b"x"]))

    @given(
        st.lists(
            st.tuples(
                st.one_of(st.binary(max_size=40), st.binary(min_size=32, max_size=32)),
                st.one_of(st.binary(max_size=30), st.binary(min_size=30, max_size=30)),
                st.one_of(st.lists(st.binary(max_size=30), max_size=4), st.lists(st.binary(max_size=30), min_size=1, max_size=1)),
            )
        )
    )
    def test_script_arguments_are_the_decoded_bundles(self, requests: List[Tuple[bytes, bytes, List[bytes]]]) -> None:
        """The command's keys and arguments are what `decode_bundle` reads, on the one-message fast path
        (a batch of single bundles, sliced at C level) as on the general one; and `pushed` counts alike."""
        target = DedupListTarget(b"orders", 5000)
        [command] = target.commands([encode_bundle(d, i, items) for d, i, items in requests])
        self.assertEqual(command[:2], (b"EVALSHA", DedupListTarget.script.sha))
        keys = [b"orders"] + [target.marker(d) for d, _, _ in requests]
        counts = b"" if all(len(items) == 1 for _, _, items in requests) else b",".join(b"%d" % len(m) for _, _, m in requests)
        args = [b"5000", counts] + [a for _, i, items in requests for a in (i, *items)]
        self.assertEqual(command[2:], (b"%d" % len(keys), *keys, *args))
        bundles = [encode_bundle(d, i, items) for d, i, items in requests]
        self.assertEqual(target.pushed(bundles, None), sum(len(items) for _, _, items in requests))
        dup_every_other = [None if k % 2 else b"first" for k in range(len(requests))]
        self.assertEqual(
            target.pushed(bundles, dup_every_other), sum(len(items) for k, (_, _, items) in enumerate(requests) if k % 2)
        )

    @given(st.binary(max_size=64), st.binary(min_size=1, max_size=255))
    def test_route_digester_is_key_digest(self, route: bytes, key: bytes) -> None:
        """The per-route digester (route hashed once) names the same markers as `key_digest`: markers
        written before it existed still catch repeats."""
        self.assertEqual(key_digester(route)(key), key_digest(route, key))


class BlockingRedis:
    """`RedisWriter`'s Redis, answered at once by a blocking call to a real redis-server."""

    ready = True

    def __init__(self, redis: RedisServer) -> None:
        self._redis = redis

    def execute(self, *args: bytes) -> Deferred[Any]:
        """The command's reply, or its error as the client's ResponseError (NOSCRIPT included)."""
        try:
            return succeed(self._redis.command(*args))
        except RedisError as e:
            return fail(ResponseError(str(e)))


class ScriptPropertyTests(unittest.TestCase):
    """The dedup script on a real Redis: whatever the batching and repeats, each key is stored once."""

    @classmethod
    def setUpClass(cls) -> None:
        cls._case = unittest.TestCase()
        cls.redis = RedisServer(cls._case)  # type: ignore[arg-type]

    @classmethod
    def tearDownClass(cls) -> None:
        cls._case.doCleanups()

    def write(self, target: DedupListTarget, batch: List[bytes]) -> Optional[List[Optional[bytes]]]:
        """One batch through the real `RedisWriter` (EVALSHA, EVAL after NOSCRIPT) on the real Redis."""
        results: List[Any] = []
        RedisWriter(Clock(), BlockingRedis(self.redis), Metrics()).write(target, batch).addBoth(results.append)
        [result] = results  # BlockingRedis answers at once
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[no-any-return]

    @settings(max_examples=60, deadline=None)
    @given(
        sends=st.lists(st.tuples(st.integers(0, 7), st.integers(1, 3)), min_size=1, max_size=30),
        cuts=st.lists(st.tuples(st.integers(1, 5), st.booleans()), max_size=10),
    )
    def test_each_key_stored_once_in_first_order(self, sends: List[Tuple[int, int]], cuts: List[Tuple[int, bool]]) -> None:
        """Requests (key k, n messages), repeats included, written in batches of random sizes (as direct
        pushes and spool replays do), with Redis losing its script cache between some batches (a restart,
        a failover): each key's first request is in the list exactly once, in order, and every repeat is
        answered with the first request's id."""
        self.redis.command("FLUSHALL")
        target = DedupListTarget(b"orders", 60_000)
        bundles = [
            encode_bundle(b"d%d" % k, b"id-%d" % i, [b"k%d-r%d-m%d" % (k, i, j) for j in range(n)])
            for i, (k, n) in enumerate(sends)
        ]
        answers: List[Any] = []
        pos = 0
        sizes = iter(cuts)
        while pos < len(bundles):
            size, flush = next(sizes, (4, False))
            if flush:
                self.redis.command("SCRIPT", "FLUSH")
            batch = bundles[pos : pos + size]
            pos += size
            outcomes = self.write(target, batch)
            answers.extend(outcomes if outcomes is not None else [None] * len(batch))
        first: Dict[int, int] = {}
        for i, (k, _) in enumerate(sends):
            first.setdefault(k, i)
        expected = [b"k%d-r%d-m%d" % (k, i, j) for i, (k, n) in enumerate(sends) if first[k] == i for j in range(n)]
        self.assertEqual(self.redis.items("orders"), expected)
        for i, (k, _) in enumerate(sends):
            self.assertEqual(answers[i], None if first[k] == i else b"id-%d" % first[k])
        markers = self.redis.command("KEYS", "{orders}:idem:*")
        self.assertEqual(len(markers), len(first), "one marker per key, in the list's hash slot")
        self.assertLessEqual(int(self.redis.command("PTTL", markers[0])), 60_000)

    def test_malformed_bundle_is_refused(self) -> None:
        """A bundle whose lengths do not add up (a corrupt spool record) raises ValueError, on the
        one-message fast path too, rather than pushing garbage."""
        target = DedupListTarget(b"orders", 60_000)
        good = encode_bundle(b"d", b"id", [b"message"])
        for bad in (good[:-1], good + b"x", b"", good[:3]):
            with self.assertRaises(ValueError):
                target.commands([bad])
        with self.assertRaises(ValueError):
            message_count(b"")


class IdempotentIngestTests(unittest.TestCase):
    """Through real relayd processes and a real Redis."""

    def test_concurrent_repeats_across_two_processes_store_once(self) -> None:
        """50 clients each send one key twice, once to each of two relayd processes (two "hosts"),
        at the same time: exactly one copy per key in Redis, and both answers carry the same id."""
        redis = RedisServer(self)
        a = RelaydProcess(self, routes=[ROUTE], redis_url=redis.url)
        b = RelaydProcess(self, routes=[ROUTE], redis_url=redis.url)
        results: Dict[int, List[Tuple[int, Any]]] = {i: [] for i in range(50)}

        def client(i: int, port: int) -> None:
            results[i].append(post(port, json.dumps({"order": i}).encode(), key=f"order-{i}"))

        threads = [
            threading.Thread(target=client, args=(i, port)) for i in range(50) for port in (a.ingest_port, b.ingest_port)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        orders = [body["order"] for body in bodies_in(redis)]
        self.assertEqual(sorted(orders), list(range(50)), "exactly one copy per key")
        for i, answers in results.items():
            self.assertEqual([s for s, _ in answers], [200, 200], answers)
            self.assertEqual(answers[0][1]["id"], answers[1][1]["id"], f"key {i}: both answers carry one id")
            self.assertEqual(sum(1 for _, body in answers if body.get("duplicate")), 1, answers)
        dups = metric_values(a).get("relayd_duplicates_dropped_total", 0) + metric_values(b).get(
            "relayd_duplicates_dropped_total", 0
        )
        self.assertEqual(dups, 50)

    def test_repeat_while_redis_is_down_is_dropped_at_replay(self) -> None:
        """Redis down: both copies are spooled and both get 2xx; when Redis returns, replay stores one."""
        redis = RedisServer(self)
        relayd = RelaydProcess(self, routes=[ROUTE], redis_url=redis.url)
        redis.stop()
        first = post(relayd.ingest_port, b'{"n": 1}', key="k-outage")
        relayd.restart()  # a restart forgets the in-memory keys: only Redis can catch the repeat
        second = post(relayd.ingest_port, b'{"n": 2}', key="k-outage")
        self.assertEqual((first[0], second[0]), (200, 200))
        self.assertNotIn("duplicate", second[1], "the repeat could not be recognised while Redis was down")
        redis.restart()
        wait_for(lambda: metric_values(relayd).get("relayd_spool_messages") == 0, 30.0, "the spool to drain")
        self.assertEqual(bodies_in(redis), [{"n": 1}])
        wait_for(
            lambda: metric_values(relayd).get("relayd_duplicates_dropped_total") == 1, 10.0, "the replay duplicate"
        )

    def test_window_expiry_and_memory_answers(self) -> None:
        """Within idempotency_window a repeat is answered from memory with the first id; after it,
        the same key stores again."""
        redis = RedisServer(self)
        relayd = RelaydProcess(self, routes=[{**ROUTE, "idempotency_window": "1s"}], redis_url=redis.url)
        s1, b1 = post(relayd.ingest_port, b'{"n": 1}', key="k-window")
        s2, b2 = post(relayd.ingest_port, b'{"n": 2}', key="k-window")
        self.assertEqual((s1, s2, b2), (200, 200, {"status": "OK", "id": b1["id"], "duplicate": True}))
        self.assertEqual(metric_values(relayd).get("relayd_duplicates_dropped_total"), 1.0)
        time.sleep(1.2)  # the scenario: the window passes
        s3, b3 = post(relayd.ingest_port, b'{"n": 3}', key="k-window")
        self.assertEqual(s3, 200)
        self.assertNotIn("duplicate", b3)
        self.assertEqual(bodies_in(redis), [{"n": 1}, {"n": 3}])

    def test_bad_headers_are_400_and_store_nothing(self) -> None:
        """Malformed keys and a weaker Relayd-Ack than the route's get 400 problems; nothing stored.
        A batch with a key is stored whole, once."""
        redis = RedisServer(self)
        relayd = RelaydProcess(self, routes=[ROUTE], redis_url=redis.url)
        for key in ("x" * 256, "two words", ""):
            status, doc = post(relayd.ingest_port, b"{}", key=key)
            self.assertEqual((status, doc["type"].rsplit("/", 1)[-1]), (400, "invalid-idempotency-key"), key)
        status, doc = post(relayd.ingest_port, b"{}", headers={"Relayd-Ack": "accepted"})
        self.assertEqual(status, 400, doc)
        status, doc = post(relayd.ingest_port, b"{}", headers={"Relayd-Ack": "sometimes"})
        self.assertEqual(status, 400, doc)
        self.assertEqual(redis.llen("orders"), 0)
        batch = b'{"line": 1}\n{"line": 2}\n'
        for _ in range(2):
            conn = http.client.HTTPConnection("127.0.0.1", relayd.ingest_port, timeout=30)
            conn.request("POST", "/orders", batch, {"Content-Type": "application/x-ndjson", "Idempotency-Key": "b1"})
            resp = conn.getresponse()
            self.assertEqual(resp.status, 200)
            resp.read()
            conn.close()
        self.assertEqual(bodies_in(redis), [{"line": 1}, {"line": 2}])
