"""One failed Redis Cluster node spools only its own share: forwarder, replay and backlog on a fake clock.

test-case-name: tests.test_per_node_spill

The forwarder and the replay run over a real `Spooler`/`Spool` in a temp
dir; Redis is `FakeClusterRedis`, the hand-answered `FakeRedis` of
tests/test_forwarder.py with per-key readiness as `ClusterClient` has it
(a key whose primary is down is not ready, the others are).  What is
checked: the healthy lists are answered and pushed directly while the
failed node's share goes through the spool (its requests answered once the
spool commit is durable), global spill mode never starts, each list stays
in offer order, and the list whose node failed goes direct again once the
replay has stored its backlog.  The real-cluster fault test is in
tests/test_cluster_relay.py.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, Dict, List, Optional, Set

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relayd.ops.metrics import Metrics
from relayd.outbox.backlog import SpoolBacklog
from relayd.outbox.buffer import NotStored, RingBuffer, Waiter
from relayd.outbox.forwarder import SPILL_RETRY, Forwarder
from relayd.outbox.replay import REPLAY_MAX_RETRY, REPLAY_RETRY, Replayer
from relayd.outbox.spooler import COMMIT_WINDOW, Spooler
from relayd.outbox.targets import ListTarget, decode_payload, encode_payload
from relayd.outbox.writer import RedisWriter
from relayd.redis.client import ResponseError, TimeoutError
from relayd.spool.spool import Spool
from tests.test_forwarder import FakeRedis

A, B, C = b"a", b"b", b"c"


class FakeClusterRedis(FakeRedis):
    """`FakeRedis` with per-key readiness, as `ClusterClient` answers it.

    Each key stands for a list on its own primary.  `node_down(key)` is what
    a dying primary does to a client: its connection drops, so every
    command on the wire to it fails, and from then on its slots are not
    ready; `node_up(key)` brings it back (listeners are told once every
    slot is writable again, as `ClusterClient.on_ready` does).
    """

    def __init__(self) -> None:
        self.down: Set[bytes] = set()
        self._up = True
        super().__init__(ready=True)

    @property  # type: ignore[override]
    def ready(self) -> bool:
        """Every slot has a connected primary."""
        return self._up and not self.down

    @ready.setter
    def ready(self, value: bool) -> None:
        self._up = value

    def ready_for(self, key: bytes) -> bool:
        """The primary of `key` is connected."""
        return self._up and key not in self.down

    def any_ready(self) -> bool:
        """Some primary is connected."""
        return self._up

    def node_down(self, key: bytes) -> None:
        """The primary of `key` dies: its commands on the wire fail, then it is not ready."""
        self.down.add(key)
        for push in self.outstanding:
            if push.key == key and push.outstanding:
                push.fail()

    def node_up(self, key: bytes) -> None:
        """The primary of `key` is back."""
        was = self.ready
        self.down.discard(key)
        if self.ready and not was:
            for listener in list(self._listeners):
                listener()


class RecordingSpooler(Spooler):
    """A real Spooler that remembers which list each appended record was for."""

    appended: List[bytes]

    def append(self, payloads: List[bytes]) -> Any:
        """Append as usual; note the lists."""
        d = super().append(payloads)
        self.appended.extend(decode_payload(p)[0].key for p in payloads)
        return d


class PerNodeFixture:
    """Forwarder + real spool + FakeClusterRedis on one Clock."""

    def __init__(self, test: SynchronousTestCase, max_in_flight: int = 4, batch_messages: int = 1000,
                 spool_bytes: int = 10**8) -> None:  # fmt: skip
        self.dir = tempfile.mkdtemp()
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.metrics = Metrics()
        self.buffer = RingBuffer(100_000, 10**8)
        self.redis = FakeClusterRedis()
        self.spooler = RecordingSpooler(self.clock, self.dir + "/w", spool_bytes, "batch", self.metrics)
        self.spooler.appended = []
        self.spooler.startService()
        test.addCleanup(lambda: self.spooler.spool.close() if self.spooler.spool is not None else None)
        self.forwarder = Forwarder(
            self.clock, self.buffer, self.redis, RedisWriter(self.clock, self.redis, self.metrics), self.spooler,
            self.metrics, batch_messages=batch_messages, batch_bytes=10**6, max_in_flight=max_in_flight,
            jitter=lambda: 0.5,
        )  # fmt: skip
        self.forwarder.startService()

    def offer(self, key: bytes, items: List[bytes], stored: bool = True) -> Optional[Waiter]:
        """What ingest does after can_store said yes."""
        waiter = Waiter(len(items)) if stored else None
        assert self.buffer.offer(ListTarget(key), items, waiter)
        return waiter

    def turn(self) -> None:
        """One reactor turn."""
        self.clock.advance(0)

    def stored(self, key: bytes) -> List[bytes]:
        """What `key` holds, oldest first (every successful LPUSH, in issue order)."""
        return [v for p in self.redis.pushes if p.key == key and p.outcome == "stored" for v in p.values]

    def gauge(self, name: str) -> float:
        """A metric's value now."""
        value = self.metrics.registry.get_sample_value(name)
        assert value is not None, name
        return value

    def drain(self, test: SynchronousTestCase) -> None:
        """Every node up; answer everything oldest first until nothing is buffered, spooled or on the wire."""
        for key in list(self.redis.down):
            self.redis.node_up(key)
        for _ in range(1000):
            while self.redis.outstanding:
                self.redis.outstanding[0].succeed()
            self.clock.advance(REPLAY_RETRY)
            spool = self.spooler.spool
            assert spool is not None
            if not self.redis.outstanding and self.buffer.messages == 0 and spool.pending_records == 0:
                return
        test.fail(f"never drained: {self.buffer.messages} in memory, {self.spooler.spool.pending_records} spooled")  # type: ignore[union-attr]


def outcome(waiter: Optional[Waiter]) -> str:
    """'stored', 'refused' (503) or 'waiting'."""
    assert waiter is not None
    if not waiter.deferred.called:
        return "waiting"
    result: List[object] = []
    waiter.deferred.addBoth(result.append)
    if result[0] is None:
        return "stored"
    assert isinstance(result[0].value, NotStored), result[0]  # type: ignore[attr-defined]
    return "refused"


class ForwarderPerNodeTests(SynchronousTestCase):
    """A failed node's share goes through the spool; the other nodes' shares go on directly."""

    def test_a_node_known_down_costs_only_its_lists_a_detour(self) -> None:
        """c's primary is down: a is pushed and answered directly, c is answered once its spool record is
        durable; c keeps going through the spool until the replay stored its backlog, then goes direct."""
        f = PerNodeFixture(self)
        f.redis.node_down(C)
        wa, wc = f.offer(A, [b"a1"]), f.offer(C, [b"c1"])
        f.turn()
        self.assertEqual([(p.key, p.values) for p in f.redis.pushes], [(A, [b"a1"])])
        self.assertEqual(f.spooler.appended, [C])
        self.assertEqual(outcome(wc), "waiting", "not answered before the spool commit is durable")
        f.redis.pushes[0].succeed()
        self.assertEqual(outcome(wa), "stored")
        f.clock.advance(COMMIT_WINDOW)
        self.assertEqual(outcome(wc), "stored")
        self.assertFalse(f.forwarder.spilling)
        self.assertEqual(f.gauge("relayd_spill_mode"), 0)
        self.assertEqual(f.gauge("relayd_spill_targets"), 1)
        self.assertTrue(f.forwarder.can_store(1, 100))
        # While c is down its new messages follow c1 into the spool; a stays direct.
        f.offer(A, [b"a2"]), f.offer(C, [b"c2"])
        f.turn()
        self.assertEqual(f.redis.outstanding[-1].values, [b"a2"])
        self.assertEqual(f.spooler.appended, [C, C])
        f.redis.succeed_all()
        # c's node is back: the replay pushes c1, c2 (and nothing of a twice).
        f.redis.node_up(C)
        f.clock.advance(REPLAY_RETRY)
        f.turn()
        self.assertEqual([(p.key, p.values) for p in f.redis.outstanding], [(C, [b"c1", b"c2"])])
        f.redis.succeed_all()
        f.turn()
        self.assertEqual(f.gauge("relayd_spill_targets"), 0)
        # Backlog stored: c goes direct again.
        f.offer(C, [b"c3"])
        f.turn()
        self.assertEqual(f.redis.outstanding[-1].values, [b"c3"])
        self.assertEqual(f.spooler.appended, [C, C], "c3 did not go through the spool")
        f.drain(self)
        self.assertEqual(f.stored(A), [b"a1", b"a2"])
        self.assertEqual(f.stored(C), [b"c1", b"c2", b"c3"])

    def test_a_failed_write_spools_that_share_and_answers_the_rest(self) -> None:
        """One batch for a and c: c's LPUSH times out, a's succeeds. a's request is answered at once, c's
        after its share is durable in the spool; no global spill; c's later messages stay behind c1."""
        f = PerNodeFixture(self)
        wa, wc = f.offer(A, [b"a1"]), f.offer(C, [b"c1"])
        f.turn()
        push_a, push_c = f.redis.pushes
        push_c.fail(TimeoutError("no reply"))
        self.assertEqual(f.spooler.appended, [C])
        push_a.succeed()
        self.assertEqual((outcome(wa), outcome(wc)), ("stored", "waiting"))
        f.clock.advance(COMMIT_WINDOW)
        self.assertEqual(outcome(wc), "stored")
        self.assertFalse(f.forwarder.spilling)
        wc2 = f.offer(C, [b"c2"])
        f.offer(A, [b"a2"])
        f.turn()
        self.assertEqual(f.spooler.appended, [C, C], "c2 queues behind c1 in the spool")
        self.assertIn([b"a2"], [p.values for p in f.redis.outstanding if p.key == A])
        f.clock.advance(COMMIT_WINDOW)
        self.assertEqual(outcome(wc2), "stored")
        f.drain(self)
        self.assertEqual(f.stored(C), [b"c1", b"c2"])
        self.assertEqual(f.stored(A), [b"a1", b"a2"])

    def test_the_spool_refusing_the_failed_nodes_share_answers_503_and_the_rest_flows(self) -> None:
        """c's node down and a tiny spool: c's requests are stored until the spool is full, then get a
        prompt 503; a's requests keep going to Redis and are answered; no global spill."""
        f = PerNodeFixture(self, spool_bytes=4096)
        f.redis.node_down(C)
        outcomes = []
        for i in range(8):
            wc = f.offer(C, [b"x" * 900])
            wa = f.offer(A, [b"a%d" % i])
            f.turn()
            f.clock.advance(max(COMMIT_WINDOW, SPILL_RETRY))
            f.redis.succeed_all()
            outcomes.append(outcome(wc))
            self.assertEqual(outcome(wa), "stored")
        self.assertNotIn("waiting", outcomes)
        self.assertGreaterEqual(outcomes.count("stored"), 2)
        self.assertGreaterEqual(outcomes.count("refused"), 2)
        self.assertEqual(f.stored(A), [b"a%d" % i for i in range(8)])
        self.assertFalse(f.forwarder.spilling)

    def test_one_redis_down_still_means_spill_mode(self) -> None:
        """Not a cluster (no per-key readiness): Redis down puts everything through the spool, as before."""
        f = PerNodeFixture(self)
        f.redis._up = False
        f.offer(A, [b"a1"]), f.offer(C, [b"c1"])
        f.turn()
        self.assertTrue(f.forwarder.spilling)
        self.assertEqual(sorted(f.spooler.appended), [A, C])


def per_node_operations() -> st.SearchStrategy:
    """Offers to three lists; faults only ever hit c's node (timeouts, a death, its return)."""
    return st.one_of(
        st.tuples(st.just("offer"), st.sampled_from([A, B, C]), st.integers(1, 3), st.booleans()),
        st.tuples(st.just("reply")),
        st.tuples(st.just("reply")),
        st.tuples(st.just("timeout_c")),
        st.tuples(st.just("down_c")),
        st.tuples(st.just("up_c")),
        st.tuples(st.just("advance"), st.sampled_from([0.0, COMMIT_WINDOW, SPILL_RETRY, REPLAY_RETRY, 1.0])),
    )


class PerNodePropertyTests(SynchronousTestCase):
    """Random schedules of c's node failing: a and b never touch the spool, every list stays in offer order."""

    @settings(max_examples=150)
    @given(steps=st.lists(per_node_operations(), max_size=60), max_in_flight=st.integers(1, 4),
           batch_messages=st.integers(1, 5))  # fmt: skip
    def test_random_node_faults_keep_each_list_exact_and_in_order(self, steps, max_in_flight, batch_messages) -> None:  # type: ignore[no-untyped-def]
        """Replies come back in issue order; a timeout or a death fails every command on the wire to c's node
        (the model counts them as not executed).  Then, once everything drained: each list holds exactly its
        offers in offer order, every stored-ack request was answered 2xx, only c's messages went through the
        spool, and global spill mode never started."""
        f = PerNodeFixture(self, max_in_flight=max_in_flight, batch_messages=batch_messages)
        offered: Dict[bytes, List[bytes]] = {A: [], B: [], C: []}
        waiters: List[Waiter] = []
        n = 0
        for step in steps:
            kind = step[0]
            if kind == "offer":
                _, key, count, stored_ack = step
                items = [b"%s-%d" % (key, n + i) for i in range(count)]
                n += count
                waiter = f.offer(key, items, stored_ack)
                if waiter is not None:
                    waiters.append(waiter)
                offered[key].extend(items)
            elif kind == "reply" and f.redis.outstanding:
                f.redis.outstanding[0].succeed()
            elif kind == "timeout_c":
                for push in f.redis.outstanding:
                    if push.key == C and push.outstanding:
                        push.fail(TimeoutError("no reply"))
            elif kind == "down_c":
                f.redis.node_down(C)
            elif kind == "up_c":
                f.redis.node_up(C)
            elif kind == "advance":
                f.clock.advance(step[1])
            self.assertFalse(f.forwarder.spilling, "global spill mode started")
        f.drain(self)
        for key in (A, B, C):
            self.assertEqual(f.stored(key), offered[key], f"list {key!r}")
        self.assertEqual(set(f.spooler.appended) - {C}, set(), "a healthy node's messages went through the spool")
        for waiter in waiters:
            self.assertEqual(outcome(waiter), "stored")
        self.assertEqual(f.gauge("relayd_spill_targets"), 0)
        self.assertEqual((f.buffer.messages, f.buffer.bytes, f.forwarder.in_flight), (0, 0, 0))


class ReplayPerTargetTests(SynchronousTestCase):
    """The replay holds a failing target for the rest of a pass and lets the others flow, once each."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.spool = Spool.open(self.dir + "/w", 10**8, fsync="never", clock=self.clock.seconds)
        self.addCleanup(self.spool.close)
        self.redis = FakeClusterRedis()
        self.backlog = SpoolBacklog()
        self.idle = 0

    def replayer(self, **kw: Any) -> Replayer:
        """A started Replayer over the spool (the test drives the clock)."""
        metrics = Metrics()
        r = Replayer(self.clock, self.spool, RedisWriter(self.clock, self.redis, metrics), metrics,
                     lambda: None, self.on_idle, backlog=self.backlog, **kw)  # fmt: skip
        self.redis.on_ready(r.kick)
        r.start()
        self.clock.advance(0)
        return r

    def on_idle(self) -> None:
        self.idle += 1

    def fill(self, keys: List[bytes]) -> None:
        """One record per key, value = its index, each in its own append."""
        for i, key in enumerate(keys):
            self.spool.append([encode_payload(ListTarget(key), b"%d" % i)])
            self.backlog.spooled(ListTarget(key), 1)

    def pushed(self, key: bytes) -> List[bytes]:
        return [v for p in self.redis.pushes if p.key == key and p.outcome == "stored" for v in p.values]

    def test_failed_target_is_held_and_the_others_flow_once(self) -> None:
        """down's LPUSH fails, up's succeeds: up is stored once, the cursor stays before down's first record;
        the next pass pushes only down's records, in their order, and skips up's."""
        self.fill([b"down", b"up"] * 3)
        self.replayer()
        for push in list(self.redis.outstanding):
            push.fail() if push.key == b"down" else push.succeed()
        self.assertEqual(self.pushed(b"up"), [b"1", b"3", b"5"])
        self.assertEqual(self.spool.pending_records, 6, "nothing acked past down's first record")
        self.assertNotIn(ListTarget(b"up"), self.backlog)
        self.assertIn(ListTarget(b"down"), self.backlog)
        self.clock.advance(0)
        self.clock.advance(REPLAY_RETRY)
        self.assertEqual([(p.key, p.values) for p in self.redis.outstanding], [(b"down", [b"0", b"2", b"4"])])
        self.redis.succeed_all()
        self.clock.advance(0)
        self.assertEqual(self.pushed(b"down"), [b"0", b"2", b"4"])
        self.assertEqual(self.pushed(b"up"), [b"1", b"3", b"5"], "no healthy record pushed twice")
        self.assertEqual(self.spool.pending_records, 0)
        self.assertEqual(len(self.backlog), 0)
        self.assertGreaterEqual(self.idle, 1)

    def test_a_held_targets_later_records_wait_for_the_next_pass(self) -> None:
        """Batches of two, one on the wire: once down failed, its later records are not sent in this pass."""
        self.fill([b"down", b"up"] * 3)
        self.replayer(pipeline=1, max_records=2)
        for _ in range(5):
            for push in list(self.redis.outstanding):
                push.fail() if push.key == b"down" else push.succeed()
            self.clock.advance(0)
        self.assertEqual([p.values for p in self.redis.pushes if p.key == b"down"], [[b"0"]])
        self.assertEqual(self.pushed(b"up"), [b"1", b"3", b"5"])

    def test_a_node_that_is_down_is_neither_written_nor_reread(self) -> None:
        """down's primary is not connected: its records are held without a command; no pass starts again
        until it is back; then its records arrive once, in order."""
        self.redis.node_down(b"down")
        self.fill([b"down", b"up"] * 3)
        self.replayer()
        self.assertEqual([p.key for p in self.redis.pushes], [b"up"])
        self.redis.succeed_all()
        for _ in range(20):
            self.clock.advance(REPLAY_RETRY)
        self.assertEqual([p.key for p in self.redis.pushes], [b"up"], "no command and no new pass while down")
        self.redis.node_up(b"down")
        self.clock.advance(REPLAY_RETRY)
        self.redis.succeed_all()
        self.clock.advance(0)
        self.assertEqual(self.pushed(b"down"), [b"0", b"2", b"4"])
        self.assertEqual(self.pushed(b"up"), [b"1", b"3", b"5"])
        self.assertEqual(self.spool.pending_records, 0)

    def test_all_targets_failing_retries_after_a_pause(self) -> None:
        """Nothing got through: nothing is acked, and the next pass sends the same records after REPLAY_RETRY."""
        self.fill([b"a", b"b"] * 2)
        self.replayer()
        for push in list(self.redis.outstanding):
            push.fail()
        self.clock.advance(0)
        self.assertEqual(self.spool.pending_records, 4)
        self.assertEqual(self.redis.outstanding, [])
        self.clock.advance(REPLAY_RETRY)
        self.assertEqual(sorted(p.key for p in self.redis.outstanding), [b"a", b"b"])

    def test_a_key_that_keeps_failing_is_retried_with_backoff(self) -> None:
        """WRONGTYPE on every attempt: passes come REPLAY_RETRY apart at first, then further, at most
        REPLAY_MAX_RETRY apart; the healthy list is stored once."""
        self.fill([b"bad", b"ok"])
        self.replayer()
        attempts: List[float] = []
        for _ in range(400):
            for push in list(self.redis.outstanding):
                if push.key == b"bad":
                    attempts.append(self.clock.seconds())
                    push.fail(ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
                else:
                    push.succeed()
            self.clock.advance(0.1)
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        self.assertLess(len(attempts), 20, gaps)
        self.assertLess(abs(gaps[0] - REPLAY_RETRY), 0.25, gaps)
        self.assertGreater(gaps[-1], REPLAY_MAX_RETRY - 0.25)
        self.assertLess(max(gaps), REPLAY_MAX_RETRY + 0.25)
        self.assertEqual(self.pushed(b"ok"), [b"1"])


class BacklogTests(SynchronousTestCase):
    """The ledger: a target has a backlog from its first spooled record until the last one is written."""

    def test_counts_up_and_down(self) -> None:
        """spooled adds, written subtracts; at zero the target is gone; unknown targets are ignored."""
        backlog = SpoolBacklog()
        t, u = ListTarget(b"t"), ListTarget(b"u")
        backlog.spooled(t, 2)
        self.assertIn(t, backlog)
        backlog.written(u, 5)  # a record from before the start: not counted
        backlog.written(t, 1)
        self.assertIn(t, backlog)
        backlog.written(t, 1)
        self.assertNotIn(t, backlog)
        self.assertEqual(len(backlog), 0)
        backlog.spooled(u, 1)
        backlog.clear()
        self.assertNotIn(u, backlog)
