"""The one replay loop over a real Spool on disk, with a hand-driven Redis (fake clock).

test-case-name: tests.test_replay
"""

from __future__ import annotations

import shutil
import tempfile
from typing import List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relayd.ops.metrics import Metrics
from relayd.outbox.replay import REPLAY_PIPELINE, REPLAY_RETRY, Replayer
from relayd.outbox.targets import ListTarget, encode_payload
from relayd.outbox.writer import RedisWriter
from relayd.spool.spool import Spool
from tests.test_forwarder import FakeRedis


class ReplayFixture(SynchronousTestCase):
    """A Replayer over a real spool in a temp dir, with a hand-driven Redis."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.spool = Spool.open(self.dir + "/w", 10**8, fsync="never", clock=self.clock.seconds)
        self.addCleanup(self.spool.close)
        self.redis = FakeRedis(ready=False)
        self.acked = 0
        self.idle = 0
        metrics = Metrics()
        self.replayer = Replayer(
            self.clock, self.spool, RedisWriter(self.clock, self.redis, metrics), metrics, self.on_acked, self.on_idle
        )
        self.redis.on_ready(self.replayer.kick)

    def on_acked(self) -> None:
        self.acked += 1

    def on_idle(self) -> None:
        self.idle += 1

    def fill(self, count: int, key: bytes = b"k") -> None:
        for i in range(0, count, 500):
            self.spool.append([encode_payload(ListTarget(key), b"%06d" % j) for j in range(i, min(count, i + 500))])

    def pushed(self, key: bytes) -> List[bytes]:
        return [v for p in self.redis.pushes if p.key == key and p.outcome == "stored" for v in p.values]



class ReplayTests(ReplayFixture):
    """Replay pushes spooled records oldest first, pipelined, and never skips a failed batch."""

    def test_pipelined_in_order_then_idle(self) -> None:
        """Up to REPLAY_PIPELINE batches go out at once; all arrive in order; on_idle once the spool is empty."""
        self.fill(5000)
        self.replayer.start()
        self.clock.advance(0)
        self.assertEqual(self.redis.pushes, [], "nothing while Redis is not ready")
        self.redis.set_ready(True)
        self.clock.advance(0)
        self.assertEqual(len(self.redis.outstanding), REPLAY_PIPELINE)
        while self.redis.outstanding:
            self.redis.outstanding[0].succeed()
            self.clock.advance(0)
        self.assertEqual(self.pushed(b"k"), [b"%06d" % i for i in range(5000)])
        self.assertEqual(self.spool.pending_records, 0)
        self.assertEqual(self.acked, 5)
        self.assertGreaterEqual(self.idle, 1)

    def test_targets_keep_their_own_order(self) -> None:
        """Records for two lists interleaved in the spool reach each list in spool order."""
        for i in range(10):
            self.spool.append([encode_payload(ListTarget(b"a" if i % 3 else b"b"), b"%d" % i)])
        self.redis.set_ready(True)
        self.replayer.start()
        self.clock.advance(0)
        self.redis.succeed_all()
        self.assertEqual(self.pushed(b"a"), [b"%d" % i for i in range(10) if i % 3])
        self.assertEqual(self.pushed(b"b"), [b"%d" % i for i in range(10) if not i % 3])

    def test_failure_in_the_middle_is_never_skipped(self) -> None:
        """Batch 1 fails while 2 and 3 succeed: nothing past batch 0 is acked; after the retry every record arrives."""
        self.fill(3000)
        self.redis.set_ready(True)
        self.replayer.start()
        self.clock.advance(0)
        first, second, third = self.redis.outstanding[:3]
        first.succeed()
        second.fail()
        third.succeed()
        self.assertEqual(self.spool.pending_records, 2000)  # only batch 0 acked
        self.clock.advance(0)  # the pass reads to the end: k is held
        self.clock.advance(REPLAY_RETRY)
        for _ in range(20):
            for push in self.redis.outstanding:
                push.succeed()
            self.clock.advance(0)
        got = self.pushed(b"k")
        self.assertEqual(sorted(set(got)), [b"%06d" % i for i in range(3000)])
        self.assertEqual(self.spool.pending_records, 0)
        first_seen: List[bytes] = []
        for v in got:
            if v not in first_seen:
                first_seen.append(v)
        self.assertEqual(first_seen[:1000], [b"%06d" % i for i in range(1000)])

    def test_stop_waits_for_batches_on_the_wire(self) -> None:
        """stop() fires only after batches in flight settled; unreplayed records stay spooled."""
        self.fill(1500)
        self.redis.set_ready(True)
        self.replayer.start()
        self.clock.advance(0)
        stopped = self.replayer.stop()
        self.assertNoResult(stopped)
        self.redis.outstanding[0].succeed()
        self.redis.outstanding[0].fail()
        self.successResultOf(stopped)
        self.assertEqual(self.spool.pending_records, 500)

    def test_undecodable_record_is_counted_and_skipped(self) -> None:
        """A CRC-valid record of an unknown target kind does not block the spool."""
        self.spool.append([b"\x00\x00\x00\x7f" + b"junk", encode_payload(ListTarget(b"k"), b"ok")])
        self.redis.set_ready(True)
        self.replayer.start()
        self.clock.advance(0)
        self.redis.succeed_all()
        self.assertEqual(self.pushed(b"k"), [b"ok"])
        self.assertEqual(self.spool.pending_records, 0)


