"""ReplyInbox's waiting entries on a fake clock (no Redis: the reader is not started).

test-case-name: tests.test_reply_inbox
"""

from __future__ import annotations

import unittest
from typing import Any, List

from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock

from relayd.config import RedisConfig
from relayd.ops.metrics import Metrics
from relayd.reply.inbox import ReplyInbox, ReplyTimeout


class WaitingEntryTests(unittest.TestCase):
    """However a wait ends (reply, timeout, forget, cancel), its entry and timer go, and it ends once."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.metrics = Metrics()
        self.inbox = ReplyInbox(self.clock, RedisConfig(), self.metrics, name=b"test:replies")

    def outcome(self, d: Any) -> List[Any]:
        """Collect the Deferred's result or failure (consumed)."""
        seen: List[Any] = []
        d.addBoth(seen.append)
        return seen

    def test_forget_cancels_the_wait_and_frees_entry_and_timer(self) -> None:
        """forget (the client left): CancelledError now, no entry, no pending timer, nothing at the timeout."""
        seen = self.outcome(self.inbox.wait("r1", 5.0))
        self.inbox.forget("r1")
        self.assertEqual(len(seen), 1)
        self.assertTrue(seen[0].check(CancelledError))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)  # nothing fires twice (AlreadyCalledError would raise here)
        self.assertEqual(len(seen), 1)
        self.assertEqual(self.metrics.registry.get_sample_value("relayd_reply_timeouts_total"), 0)

    def test_cancelling_the_deferred_frees_the_entry(self) -> None:
        """A caller that cancels the Deferred itself (Klein does, when its client leaves) frees the entry too."""
        d = self.inbox.wait("r2", 5.0)
        seen = self.outcome(d)
        d.cancel()
        self.assertTrue(seen[0].check(CancelledError))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.inbox.forget("r2")  # a second forget is a no-op
        self.clock.advance(10)
        self.assertEqual(len(seen), 1)

    def test_timeout_fails_once_and_a_late_forget_is_harmless(self) -> None:
        """No reply in time: ReplyTimeout once, counted; forgetting afterwards changes nothing."""
        seen = self.outcome(self.inbox.wait("r3", 5.0))
        self.clock.advance(5.0)
        self.assertTrue(seen[0].check(ReplyTimeout))
        self.inbox.forget("r3")
        self.assertEqual(len(seen), 1)
        self.assertEqual(self.metrics.registry.get_sample_value("relayd_reply_timeouts_total"), 1)
