"""The spooler over a real Spool on disk: group commit and pipelined replay (fake clock and Redis)."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relayd.outbox.buffer import RingBuffer, Waiter
from relayd.ops.metrics import Metrics
from relayd.outbox.spooler import COMMIT_WINDOW, REPLAY_PIPELINE, REPLAY_RETRY, Spooler
from tests.test_forwarder import FakeRedis


class SpoolerFixture:
    """A started Spooler in a temp dir, with a real buffer and a hand-driven Redis."""

    def make(self, test: SynchronousTestCase, ready: bool = False, fsync: str = "batch") -> None:
        self.dir = tempfile.mkdtemp()
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.buffer = RingBuffer(10**6, 10**9)
        self.redis = FakeRedis(ready=ready)
        self.spooler = Spooler(self.clock, self.dir + "/w", 10**8, fsync, self.buffer, self.redis, Metrics())
        self.spooler.startService()
        test.addCleanup(lambda: self.spooler.running and self.spooler.stopService())

    def spill(self, key: bytes, items, stored: bool = True):
        """Offer to the buffer, take as the forwarder would, spill; returns the waiter."""
        waiter = Waiter(len(items)) if stored else None
        assert self.buffer.offer(key, list(items), waiter)
        batch = self.buffer.take(10**6, 10**9)
        assert self.spooler.spill(batch)
        return waiter

    def pushed(self, key: bytes):
        return [v for p in self.redis.pushes if p.key == key and p.outcome == "stored" for v in p.values]


class GroupCommitTests(SynchronousTestCase, SpoolerFixture):
    """Stored acks fire after the fsync of the commit window, not before."""

    def test_waiters_fire_after_commit(self):
        """Two spills in one window share one commit; both waiters fire only then."""
        self.make(self)
        self.spooler.activate("test")
        w1 = self.spill(b"k", [b"a"])
        w2 = self.spill(b"k", [b"b", b"c"])
        self.assertFalse(w1.deferred.called or w2.deferred.called)
        self.clock.advance(COMMIT_WINDOW)
        self.assertTrue(w1.deferred.called and w2.deferred.called)
        self.assertEqual(self.buffer.messages, 0)
        self.assertEqual(self.spooler.spool.pending_records, 3)

    def test_unusable_spool_refuses(self):
        """After a write error the spool refuses spills for a while (then 503s upstream)."""
        self.make(self)
        self.spooler._blocked_until = self.clock.seconds() + 1.0
        self.assertFalse(self.spooler.usable)
        self.buffer.offer(b"k", [b"x"], None)
        self.assertFalse(self.spooler.spill(self.buffer.take(10, 10**6)))


class ReplayTests(SynchronousTestCase, SpoolerFixture):
    """Replay pushes spooled records oldest first, pipelined, and never skips a failed batch."""

    def fill(self, count: int) -> None:
        self.spooler.activate("test")
        for i in range(0, count, 500):
            self.spill(b"k", [b"%06d" % j for j in range(i, min(count, i + 500))], stored=False)
        self.clock.advance(COMMIT_WINDOW)

    def test_pipelined_in_order_and_mode_ends(self):
        """Up to REPLAY_PIPELINE batches go out at once; all arrive in order; spill mode ends when empty."""
        self.make(self)
        self.fill(5000)
        self.redis.set_ready(True)
        self.clock.advance(0)
        self.assertEqual(len(self.redis.outstanding), REPLAY_PIPELINE)
        while self.redis.outstanding:
            self.redis.outstanding[0].succeed()
            self.clock.advance(0)
        self.assertEqual(self.pushed(b"k"), [b"%06d" % i for i in range(5000)])
        self.assertEqual(self.spooler.spool.pending_records, 0)
        self.assertFalse(self.spooler.active)

    def test_failure_in_the_middle_is_never_skipped(self):
        """Batch 1 fails while 2 and 3 succeed: nothing past batch 0 is acked; after the retry every record arrives."""
        self.make(self)
        self.fill(3000)
        self.redis.set_ready(True)
        self.clock.advance(0)
        first, second, third = self.redis.outstanding[:3]
        first.succeed()
        second.fail()
        third.succeed()
        self.assertEqual(self.spooler.spool.pending_records, 2000)  # only batch 0 acked
        self.clock.advance(REPLAY_RETRY)
        for _ in range(20):
            for push in self.redis.outstanding:
                push.succeed()
            self.clock.advance(0)
        got = self.pushed(b"k")
        self.assertEqual(sorted(set(got)), [b"%06d" % i for i in range(3000)])
        self.assertEqual(self.spooler.spool.pending_records, 0)
        first_seen = []
        for v in got:
            if v not in first_seen:
                first_seen.append(v)
        self.assertEqual(first_seen[:1000], [b"%06d" % i for i in range(1000)])

    def test_stop_waits_for_batches_on_the_wire(self):
        """stopService fires only after replay batches in flight settled; unreplayed records stay spooled."""
        self.make(self)
        self.fill(1500)
        self.redis.set_ready(True)
        self.clock.advance(0)
        stopped = self.spooler.stopService()
        self.assertNoResult(stopped)
        self.redis.outstanding[0].succeed()
        self.redis.outstanding[0].fail()
        self.successResultOf(stopped)
        self.assertTrue(self.spooler.spool.closed)


class ThreadedCommitTests(SynchronousTestCase):
    """The fsync runs off the reactor; what arrives meanwhile forms the next group."""

    def make(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.buffer = RingBuffer(10**6, 10**9)
        self.calls = []  # (deferred, function, args) of each "thread" job, run by hand

        def run_in_thread(f, *args):
            d = Deferred()
            self.calls.append((d, f, args))
            return d

        self.spooler = Spooler(
            self.clock, self.dir + "/w", 10**8, "batch", self.buffer, FakeRedis(ready=False), Metrics(),
            run_in_thread=run_in_thread,
        )
        self.spooler.startService()
        self.spooler.activate("test")

    def spill(self, item):
        waiter = Waiter(1)
        self.buffer.offer(b"k", [item], waiter)
        self.assertTrue(self.spooler.spill(self.buffer.take(10, 10**6)))
        return waiter

    def finish(self, error=None):
        d, f, args = self.calls.pop(0)
        if error is None:
            f(*args)
            d.callback(None)
        else:
            for fd in args[0].fds:
                os.close(fd)
            d.errback(error)

    def test_groups_while_syncing(self):
        """A waiter fires only after its own group's fsync; appends during a sync wait for the next one."""
        self.make()
        first = self.spill(b"a")
        self.clock.advance(COMMIT_WINDOW)
        self.assertEqual(len(self.calls), 1)
        second = self.spill(b"b")
        self.clock.advance(COMMIT_WINDOW)
        self.assertEqual(len(self.calls), 1, "one sync at a time")
        self.assertFalse(first.deferred.called or second.deferred.called)
        self.finish()
        self.assertTrue(first.deferred.called)
        self.assertFalse(second.deferred.called)
        self.clock.advance(COMMIT_WINDOW)
        self.finish()
        self.assertTrue(second.deferred.called)
        self.assertEqual(self.buffer.messages, 0)

    def test_failed_fsync_answers_nothing(self):
        """An fsync error fails its group and what was appended meanwhile, with a 503 problem; nothing is acked."""
        self.make()
        first = self.spill(b"a")
        self.clock.advance(COMMIT_WINDOW)
        second = self.spill(b"b")
        failures = []
        first.deferred.addErrback(failures.append)
        second.deferred.addErrback(failures.append)
        self.finish(OSError(5, "Input/output error"))
        self.assertEqual([f.value.status for f in failures], [503, 503])
        self.assertFalse(self.spooler.usable)
        self.assertEqual(self.buffer.messages, 0)
