"""The forwarder's spill path over a real Spooler: prompt answers when nothing can store.

Issue 16's cases on a fake clock: Redis down and the spool full or failing
must give a stored request a prompt 503 (never the ack timeout), the
refusal window after a write error ends on time, ``can_store`` (what ingest
and /readyz ask) agrees with what the forwarder does, and accepted messages
are never dropped.

test-case-name: tests.test_forwarder_spill
"""

from __future__ import annotations

import shutil
import tempfile
from typing import List, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relayd.ops.metrics import Metrics
from relayd.outbox.buffer import NotStored, RingBuffer, Waiter
from relayd.outbox.forwarder import SPILL_RETRY, Forwarder
from relayd.outbox.spooler import COMMIT_WINDOW, RETRY_AFTER_ERROR, Spooler
from relayd.outbox.targets import ListTarget
from relayd.outbox.writer import RedisWriter
from tests.test_forwarder import FakeRedis

KEY = ListTarget(b"k")


class SpillFixture:
    """Forwarder + real Spooler (tiny max_bytes) + hand-driven Redis, on one Clock."""

    def make(self, test: SynchronousTestCase, max_bytes: int = 4096, ready: bool = False) -> None:
        self.dir = tempfile.mkdtemp()
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        metrics = Metrics()
        self.buffer = RingBuffer(10_000, 10**8)
        self.redis = FakeRedis(ready=ready)
        self.spooler = Spooler(self.clock, self.dir + "/w", max_bytes, "batch", metrics)
        self.spooler.startService()
        self.forwarder = Forwarder(
            self.clock, self.buffer, self.redis, RedisWriter(self.clock, self.redis, metrics), self.spooler, metrics,
            batch_messages=1, batch_bytes=10**6, max_in_flight=4,
        )
        self.forwarder.startService()

    def request(self, size: int = 900, stored: bool = True) -> Optional[Waiter]:
        """What ingest does: ask can_store, then offer one message."""
        item = b"x" * size
        if stored and not self.forwarder.can_store(1, size):
            return None
        waiter = Waiter(1) if stored else None
        assert self.buffer.offer(KEY, [item], waiter)
        return waiter

    def outcome(self, waiter: Waiter) -> str:
        """'stored', 'refused' (503, nothing stored), 'maybe' (503, may be stored) or 'waiting'."""
        if not waiter.deferred.called:
            return "waiting"
        result: List[object] = []
        waiter.deferred.addBoth(result.append)
        value = result[0]
        if value is None:
            return "stored"
        error = value.value  # type: ignore[attr-defined]
        assert isinstance(error, NotStored), error
        return "maybe" if error.maybe_stored else "refused"


class FullSpoolTests(SynchronousTestCase, SpillFixture):
    """Redis down, spool filling up: 2xx while it takes writes, then prompt 503s; never a hang."""

    def test_every_request_is_answered_within_one_commit_or_refused_at_once(self) -> None:
        """Requests of ~900 B into a 4 KiB spool: the first few are stored after one commit window,
        every later one is refused by can_store or answered 503 within SPILL_RETRY; none waits longer."""
        self.make(self)
        outcomes = []
        for _ in range(20):
            waiter = self.request()
            if waiter is None:
                outcomes.append("refused-at-ingest")
                continue
            self.clock.advance(0)
            self.clock.advance(max(COMMIT_WINDOW, SPILL_RETRY))
            outcomes.append(self.outcome(waiter))
        self.assertNotIn("waiting", outcomes)
        self.assertGreaterEqual(outcomes.count("stored"), 3)
        self.assertEqual(outcomes[: outcomes.count("stored")], ["stored"] * outcomes.count("stored"))
        self.assertEqual(self.buffer.messages, 0, "refused requests leave nothing in memory")
        self.assertEqual(self.spooler.spool.pending_records, outcomes.count("stored"))

    def test_a_request_racing_past_can_store_is_refused_promptly(self) -> None:
        """can_store said yes but the spool filled meanwhile: the request gets a 503 within SPILL_RETRY
        (it used to be requeued every 0.1 s until the 10 s ack timeout)."""
        self.make(self, max_bytes=2048)
        first = self.request(size=1100)
        second = self.request(size=1100)  # both pass can_store: they are not spilled yet
        assert first is not None and second is not None
        self.clock.advance(0)
        self.clock.advance(COMMIT_WINDOW)
        self.assertEqual(self.outcome(first), "stored")
        self.assertEqual(self.outcome(second), "refused")
        self.assertFalse(self.forwarder.can_store(1, 1000), "readiness agrees: nothing can store it")

    def test_accepted_messages_are_kept_and_delivered_when_redis_returns(self) -> None:
        """A refused spill never drops an acknowledged (accepted) message: it waits in memory for Redis."""
        self.make(self, max_bytes=1024)
        for _ in range(3):
            self.request(size=600, stored=False)
        self.clock.advance(0)
        self.clock.advance(COMMIT_WINDOW)
        for _ in range(5):
            self.clock.advance(SPILL_RETRY)
        self.assertEqual(self.buffer.messages, 2, "two did not fit the spool and stay in memory")
        self.redis.set_ready(True)
        for _ in range(10):
            self.clock.advance(SPILL_RETRY)
            self.redis.succeed_all()
        stored = [v for p in self.redis.pushes if p.outcome == "stored" for v in p.values]
        self.assertEqual(len(stored), 3)
        self.assertEqual(self.buffer.messages, 0)
        self.assertFalse(self.forwarder.spilling)


class RefusalWindowTests(SynchronousTestCase, SpillFixture):
    """The refusal window after a write error: closed until RETRY_AFTER_ERROR, open exactly then."""

    def test_window_edge(self) -> None:
        """Inside the window can_store is False (ingest answers 503 at once); at its end a request is
        taken again and stored after one commit."""
        self.make(self, max_bytes=10**6)
        self.spooler._refuse("write", "injected EIO")
        start = self.clock.seconds()
        self.clock.advance(RETRY_AFTER_ERROR - 0.001)
        self.assertFalse(self.forwarder.can_store(1, 10))
        self.assertIsNone(self.request(size=10))
        self.clock.advance(start + RETRY_AFTER_ERROR - self.clock.seconds())
        self.assertTrue(self.forwarder.can_store(1, 10))
        waiter = self.request(size=10)
        assert waiter is not None
        self.clock.advance(0)
        self.clock.advance(COMMIT_WINDOW)
        self.assertEqual(self.outcome(waiter), "stored")

    def test_redis_ready_means_can_store_in_direct_mode(self) -> None:
        """In direct mode a ready Redis can store whatever the spool says."""
        self.make(self, max_bytes=10**6, ready=True)
        self.spooler._refuse("write", "injected EIO")
        self.assertFalse(self.forwarder.spilling)
        self.assertTrue(self.forwarder.can_store(1, 10))
        waiter = self.request(size=10)
        assert waiter is not None
        self.clock.advance(0)
        self.redis.succeed_all()
        self.assertEqual(self.outcome(waiter), "stored")
