"""Live fan-out end to end: real relayd processes, a real Redis, SSE subscribers on real sockets.

test-case-name: tests.test_fanout
"""

from __future__ import annotations

import json
import os
import socket
import unittest
from typing import Any, Dict, List

from relayd.fanout.changes import CHANGES_KEY
from relayd.fanout.reader import SWEEP_INTERVAL
from tests.fault_tools import metric_values
from tests.harness import RedisServer, RelaydProcess, wait_for
from tests.sse_client import SSEClient

ROUTE = {"path": "/tracking/{team}", "stream": "tracking:{team}", "history": 1000}
ARRIVAL = 20.0  # seconds for events to arrive on a loaded box


def post(relayd: RelaydProcess, team: str, body: Dict[str, Any], keep_alive: bool = True) -> str:
    """POST one position; the message id (fails on a non-2xx)."""
    status, _, raw = relayd.post(f"/tracking/{team}", json.dumps(body).encode(), keep_alive=keep_alive)
    assert status == 200, (status, raw)
    return json.loads(raw)["id"]


def diagnose(relayd: RelaydProcess) -> Any:
    """For `wait_for`'s `explain`: relayd's fan-out and Redis metrics and its log tail."""

    def explain() -> str:
        values = metric_values(relayd)
        keep = ("fanout", "redis_up", "redis_errors", "spill_mode", "spool_messages", "reactor_lag")
        shown = {k: v for k, v in values.items() if any(w in k for w in keep)}
        return f"metrics {shown}; log tail:\n{relayd.log_tail(3000)}"

    return explain


def bodies(sub: SSEClient) -> List[Dict[str, Any]]:
    """The message bodies a subscriber received, in order."""
    return [json.loads(d)["body"] for d in sub.data()]


#: Attempts `subscribe` makes when relayd answers 503 (its Redis read timed out on a loaded box).
SUBSCRIBE_ATTEMPTS = 5


def subscribe(relayd: RelaydProcess, team: str, **kw: Any) -> SSEClient:
    """A subscriber of one team whose 200 response has started (so it is registered).

    A subscription's first Redis read can time out on a loaded box: relayd
    answers 503 with Retry-After (the contract's "not ready"), and a client
    subscribes again, so this does too (at most SUBSCRIBE_ATTEMPTS times).
    Any other status fails here, where it happened, not later as "events
    did not arrive".
    """
    for _ in range(SUBSCRIBE_ATTEMPTS):
        sub = SSEClient(relayd.ingest_port, f"/tracking/{team}", **kw)
        started = lambda s=sub: s.retry is not None or (s.status is not None and s.status != 200)  # noqa: E731
        wait_for(started, ARRIVAL, "the SSE response")
        if sub.status == 200:
            return sub
        sub.close()
        if sub.status != 503:
            break
    raise AssertionError(f"subscribing to {team}: {sub.status} {sub.body[:300]!r}; log tail:\n{relayd.log_tail()}")


def xread_clients(redis: RedisServer) -> int:
    """Redis connections blocked in XREAD now (one per relayd process reading streams)."""
    return sum(1 for line in redis.command("CLIENT", "LIST").decode().splitlines() if "cmd=xread" in line)


def rss_kib(pid: int) -> int:
    """Resident set size of a process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class FanoutTests(unittest.TestCase):
    """One relayd process (unless said otherwise) on a real Redis."""

    def setUp(self) -> None:
        self.redis = RedisServer(self)

    def start(self, routes: Any = (ROUTE,), **kw: Any) -> RelaydProcess:
        """A relayd that is ready *and* connected to Redis.

        /readyz means "can store", which the spool alone satisfies, so it can
        answer 200 before the Redis connection is up; a subscription needs
        that connection (503 without it), so wait for ``relayd_redis_up``.
        """
        relayd = RelaydProcess(self, routes=list(routes), redis_url=self.redis.url, **kw)
        wait_for(lambda: metric_values(relayd).get("relayd_redis_up") == 1.0, ARRIVAL, "relayd connected to Redis")
        return relayd

    def stuck_subscriber(self, relayd: RelaydProcess) -> SSEClient:
        """A subscriber that never reads, whose response has started (peeked, not read).

        A loaded box can make the subscription's first Redis read time out
        (a 503 problem, which a browser retries); the test retries too.
        """
        for _ in range(5):
            stuck = SSEClient(relayd.ingest_port, "/tracking/red", read=False, rcvbuf=4096)
            self.addCleanup(stuck.close)

            def answered(sock: socket.socket = stuck.sock) -> bytes:
                data = sock.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                done = b"retry:" in data or (b"\r\n\r\n" in data and not data.startswith(b"HTTP/1.1 200"))
                return data if done else b""

            if b"retry:" in wait_for(answered, ARRIVAL, "the stuck subscriber's response"):
                return stuck
        raise AssertionError("no subscription for the stuck subscriber in 5 attempts")

    def close_all(self, *subs: SSEClient) -> None:
        for sub in subs:
            sub.close()

    def test_events_in_order_per_team_without_leaks(self) -> None:
        """Each subscriber gets its team's messages, all, in order, as id + envelope; nothing of other teams."""
        relayd = self.start()
        red = [subscribe(relayd, "red") for _ in range(3)]
        blue = [subscribe(relayd, "blue") for _ in range(2)]
        self.addCleanup(self.close_all, *red, *blue)
        sent: Dict[str, List[str]] = {"red": [], "blue": []}
        for i in range(60):
            team = "red" if i % 3 else "blue"
            sent[team].append(post(relayd, team, {"team": team, "seq": i}))
        for team, subs in (("red", red), ("blue", blue)):
            for sub in subs:
                wait_for(lambda s=sub, n=len(sent[team]): len(s.events) >= n, ARRIVAL, f"{team} events", explain=diagnose(relayd))
                envelopes = [json.loads(d) for d in sub.data()]
                self.assertEqual([e["id"] for e in envelopes], sent[team])
                self.assertTrue(all(e["body"]["team"] == team for e in envelopes))
                entry_ids = self.redis.command("XRANGE", f"tracking:{team}", "-", "+")
                self.assertEqual(sub.ids(), [e[0].decode() for e in entry_ids])
                self.assertGreaterEqual(sub.retry, 2000)
        self.assertIn(b"text/event-stream", red[0].head)
        values = metric_values(relayd)
        self.assertEqual(values["relayd_fanout_subscribers"], 5)
        self.assertEqual(values["relayd_fanout_events_sent_total"], 40 * 3 + 20 * 2)
        self.assertEqual(values["relayd_fanout_latency_seconds_count"], 60)

    def test_list_and_stream_route_stores_both(self) -> None:
        """A route with list and stream: the 2xx means the message is in both; a ``{{name}}`` hash tag stays literal."""
        relayd = self.start([{"path": "/pos/{team}", "list": "pos:{team}", "stream": "pos:{{team}}:live"}])
        for i in range(5):
            status, _, raw = relayd.post("/pos/t1", json.dumps({"seq": i}).encode())
            self.assertEqual(status, 200, raw)
        self.assertEqual(self.redis.llen("pos:t1"), 5)
        self.assertEqual(self.redis.command("XLEN", "pos:{t1}:live"), 5)

    def test_bad_segments_and_wrong_requests(self) -> None:
        """A bad segment is 404; a malformed or future Last-Event-ID is 400; GET without SSE is 406."""
        relayd = self.start()
        self.assertEqual(relayd.post("/tracking/a%20b", b"{}")[0], 404)
        self.assertEqual(relayd.post("/tracking/" + "x" * 129, b"{}")[0], 404)
        self.assertEqual(relayd.post("/tracking/a/b", b"{}")[0], 404)
        self.assertEqual(relayd.post("/tracking/" + "x" * 128, b"{}")[0], 200)
        self.assertEqual(relayd.request("GET", "/tracking/red")[0], 406)
        for bad in ("abc", "1-2-3", "99999999999999-0"):
            sub = SSEClient(relayd.ingest_port, "/tracking/red", last_event_id=bad)
            self.addCleanup(sub.close)
            wait_for(lambda s=sub: s.closed, ARRIVAL, "the problem response")
            self.assertEqual(sub.status, 400, bad)
            self.assertIn(b"application/problem+json", sub.head)
        sub = SSEClient(relayd.ingest_port, "/tracking/a%7Bb")
        self.addCleanup(sub.close)
        wait_for(lambda: sub.closed, ARRIVAL, "the problem response")
        self.assertEqual(sub.status, 404)

    def test_route_auth_applies_to_subscribers(self) -> None:
        """A route with bearer tokens: a subscriber without one gets 401, with one it subscribes."""
        relayd = self.start([{**ROUTE, "auth_tokens_file": "tokens"}], files={"tokens": "s3cret\n"})
        sub = SSEClient(relayd.ingest_port, "/tracking/red")
        self.addCleanup(sub.close)
        wait_for(lambda: sub.closed, ARRIVAL, "the problem response")
        self.assertEqual(sub.status, 401)
        ok = subscribe(relayd, "red", headers={"Authorization": "Bearer s3cret"})
        self.addCleanup(ok.close)
        self.assertEqual(ok.status, 200)

    def test_resume_exactly_once_then_live(self) -> None:
        """Drop after event k, messages keep coming, reconnect with Last-Event-ID: k+1.. exactly once, then live."""
        relayd = self.start([{**ROUTE, "history": 5000}])
        first = subscribe(relayd, "red")
        ids = [post(relayd, "red", {"seq": i}) for i in range(10)]
        wait_for(lambda: len(first.events) == 10, ARRIVAL, "10 events", explain=diagnose(relayd))
        k = 4
        last_id = first.ids()[k]
        first.close()
        ids += [post(relayd, "red", {"seq": i}) for i in range(10, 1200)]  # more than one replay page
        again = subscribe(relayd, "red", last_event_id=last_id)
        self.addCleanup(again.close)
        ids += [post(relayd, "red", {"seq": i}) for i in range(1200, 1230)]
        wait_for(lambda: len(again.events) >= 1230 - k - 1, ARRIVAL, "replay and live events", explain=diagnose(relayd))
        self.assertEqual([b["seq"] for b in bodies(again)], list(range(k + 1, 1230)))
        self.assertEqual(len(set(again.ids())), len(again.ids()))
        # The query-string form, and an id older than the history (starts at the oldest held).
        oldest = self.redis.command("XRANGE", "tracking:red", "-", "+", "COUNT", 1)[0][0].decode()
        query = SSEClient(relayd.ingest_port, "/tracking/red?last_event_id=1-0")
        self.addCleanup(query.close)
        wait_for(lambda: len(query.events) > 0, ARRIVAL, "replay from the oldest entry", explain=diagnose(relayd))
        self.assertEqual(query.ids()[0], oldest)

    def test_resume_seam_under_concurrent_posts(self) -> None:
        """Subscribers resuming while messages arrive concurrently see no gap and no duplicate at the seam."""
        relayd = self.start()
        ids = [post(relayd, "red", {"seq": i}) for i in range(50)]
        entry_ids = [e[0].decode() for e in self.redis.command("XRANGE", "tracking:red", "-", "+")]
        subs = []
        for round_ in range(6):
            subs.append(SSEClient(relayd.ingest_port, "/tracking/red", last_event_id=entry_ids[round_ * 5]))
            ids += [post(relayd, "red", {"seq": 50 + round_ * 20 + j}) for j in range(20)]
        self.addCleanup(self.close_all, *subs)
        total = len(ids)
        for n, sub in enumerate(subs):
            start = n * 5 + 1
            wait_for(lambda s=sub, n=total - start: len(s.events) >= n, ARRIVAL, "all events", explain=diagnose(relayd))
            self.assertEqual([b["seq"] for b in bodies(sub)], list(range(start, total)))

    def test_slow_subscriber_is_cut_and_memory_stays_bounded(self) -> None:
        """A subscriber that never reads is cut and counted; RSS stays bounded; a reading one gets everything."""
        relayd = self.start()
        assert relayd.proc is not None
        reader = subscribe(relayd, "red")
        self.addCleanup(reader.close)
        self.stuck_subscriber(relayd)  # subscribed, never reads
        wait_for(lambda: metric_values(relayd).get("relayd_fanout_subscribers") == 2, ARRIVAL, "two subscribers")
        blob = "x" * 100_000
        for i in range(20):  # warm up: allocator arenas, buffers
            post(relayd, "red", {"seq": i, "pad": blob})
        wait_for(lambda: len(reader.events) == 20, ARRIVAL, "warm-up events", explain=diagnose(relayd))
        before = rss_kib(relayd.proc.pid)
        count = 400  # 40 MB of events: buffered for the stuck one, RSS would grow by that much
        # In groups the reading subscriber takes before the next: it is never
        # ~1 MiB behind (the cut bound) however slowly a loaded box runs its
        # reading thread; the stuck one falls behind by all 40 MB.
        for start in range(20, count, 5):
            for i in range(start, start + 5):
                post(relayd, "red", {"seq": i, "pad": blob})
            wait_for(lambda n=start + 5: len(reader.events) >= n, ARRIVAL, "the group at the reading subscriber")
        try:
            wait_for(lambda: len(reader.events) == count, ARRIVAL * 2, "every event at the reading subscriber", explain=diagnose(relayd))
        except AssertionError:
            raise AssertionError(f"{len(reader.events)} events; {metric_values(relayd)}; {relayd.log_tail()}") from None
        self.assertEqual([b["seq"] for b in bodies(reader)], list(range(count)))
        values = metric_values(relayd)
        self.assertEqual(values.get('relayd_fanout_subscribers_cut_total'), 1.0, values)
        self.assertEqual(values["relayd_fanout_subscribers"], 1)
        growth = rss_kib(relayd.proc.pid) - before
        self.assertLess(growth, 25_000, f"RSS grew by {growth} KiB while 40 MB went to a stuck subscriber")

    def test_redis_restart_under_subscribers(self) -> None:
        """Redis restarts empty under live subscribers: posts before, during (spooled) and after all arrive, in order."""
        relayd = self.start()
        subs = [subscribe(relayd, "red") for _ in range(2)]
        self.addCleanup(self.close_all, *subs)
        for i in range(10):
            post(relayd, "red", {"seq": i})
        wait_for(lambda: all(len(s.events) == 10 for s in subs), ARRIVAL, "events before the restart", explain=diagnose(relayd))
        self.redis.stop()
        for i in range(10, 20):
            post(relayd, "red", {"seq": i})  # stored ack: fsynced in the spool
        self.redis.start()
        for i in range(20, 30):
            post(relayd, "red", {"seq": i})
        for sub in subs:
            wait_for(lambda s=sub: len(s.events) >= 30, ARRIVAL * 2, "events after the restart", explain=diagnose(relayd))
            self.assertEqual([b["seq"] for b in bodies(sub)], list(range(30)))
        self.assertTrue(all(not s.closed for s in subs), "subscriptions stay open across a Redis restart")

    def test_two_instances_on_one_redis(self) -> None:
        """Two relayd "hosts" on one Redis: a subscriber on one sees what the other ingested, in order."""
        a = self.start()
        b = self.start()
        sub_a = subscribe(a, "red")
        sub_b = subscribe(b, "red")
        self.addCleanup(self.close_all, sub_a, sub_b)
        for i in range(20):
            post(b if i % 2 else a, "red", {"seq": i})
        for sub in (sub_a, sub_b):
            wait_for(lambda s=sub: len(s.events) >= 20, ARRIVAL, "events from both hosts")
            self.assertEqual([x["seq"] for x in bodies(sub)], list(range(20)))

    def test_each_stream_batch_is_named_in_the_change_log(self) -> None:
        """A POST to a stream route also appends the stream's name to the change log readers follow."""
        relayd = self.start()
        post(relayd, "red", {"seq": 0})
        post(relayd, "blue", {"seq": 1})
        entries = self.redis.command("XRANGE", CHANGES_KEY, "-", "+")
        self.assertEqual([fields[1] for _, fields in entries], [b"tracking:red", b"tracking:blue"])

    def test_reader_reconnect_misses_nothing(self) -> None:
        """The reader's connection is killed while messages arrive: on reconnect it sweeps its streams, all arrive in order."""
        relayd = self.start()
        sub = subscribe(relayd, "red")
        self.addCleanup(sub.close)
        post(relayd, "red", {"seq": 0})
        wait_for(lambda: len(sub.events) == 1, ARRIVAL, "the first event")
        readers = [
            line.split()[0].split("=")[1]
            for line in self.redis.command("CLIENT", "LIST").decode().splitlines()
            if "cmd=xread" in line
        ]
        self.assertEqual(len(readers), 1, "one reader blocked on the change log")
        self.redis.command("CLIENT", "KILL", "ID", readers[0])
        for i in range(1, 10):
            post(relayd, "red", {"seq": i})
        wait_for(lambda: len(sub.events) >= 10, ARRIVAL, "every event after the reader reconnected")
        self.assertEqual([b["seq"] for b in bodies(sub)], list(range(10)))

    def test_entries_without_a_change_note_arrive_by_the_sweep(self) -> None:
        """An entry another producer XADDs without a change-log note still arrives: every watched stream is swept periodically."""
        relayd = self.start()
        sub = subscribe(relayd, "red")
        self.addCleanup(sub.close)
        post(relayd, "red", {"seq": 0})
        wait_for(lambda: len(sub.events) == 1, ARRIVAL, "the first event")
        self.redis.command("XADD", "tracking:red", "*", "data", json.dumps({"body": {"seq": 1}}))
        wait_for(lambda: len(sub.events) >= 2, SWEEP_INTERVAL + ARRIVAL, "the un-noted entry, by the sweep")
        self.assertEqual([b["seq"] for b in bodies(sub)], [0, 1])

    def test_workers_2_every_subscriber_gets_everything(self) -> None:
        """workers = 2: subscribers on both processes each get every message posted through either, in order, per team."""
        relayd = self.start(server={"workers": 2})
        subs = {team: [subscribe(relayd, team) for _ in range(6)] for team in ("red", "blue")}
        self.addCleanup(self.close_all, *subs["red"], *subs["blue"])
        wait_for(lambda: xread_clients(self.redis) == 2, ARRIVAL, "a stream reader in each worker")
        sent: Dict[str, List[str]] = {"red": [], "blue": []}
        for i in range(80):
            team = "red" if i % 2 else "blue"
            sent[team].append(post(relayd, team, {"team": team, "seq": i}, keep_alive=False))
        for team, group in subs.items():
            for sub in group:
                wait_for(lambda s=sub: len(s.events) >= 40, ARRIVAL, f"{team} events", explain=diagnose(relayd))
                self.assertEqual([json.loads(d)["id"] for d in sub.data()], sent[team])
        self.assertEqual(relayd.terminate(), 0, relayd.log_tail())
        for group in subs.values():
            for sub in group:
                wait_for(lambda s=sub: s.closed, ARRIVAL, "subscriptions ended at stop")


if os.environ.get("RELAYD_SKIP_FANOUT"):  # pragma: no cover - a local escape hatch, never in CI
    del FanoutTests
