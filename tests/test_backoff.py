"""The restart policy of dead workers (relayd/process/backoff.py).

test-case-name: tests.test_backoff
"""

from __future__ import annotations

import random
import unittest

from hypothesis import given
from hypothesis import strategies as st

from relayd.process.backoff import RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN, RESTART_BACKOFF_RESET, RestartPolicy


class RestartPolicyTests(unittest.TestCase):
    """Jittered exponential backoff per slot, reset by a long run or a new generation."""

    def test_doubles_per_quick_death_up_to_the_cap(self):
        """Quick deaths double the delay (within the jitter: half to full), up to the cap."""
        policy = RestartPolicy(random.Random(1))
        for n in range(12):
            full = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN * 2**n)
            delay = policy.delay(0, ran_for=0.5)
            self.assertGreaterEqual(delay, full * 0.5)
            self.assertLessEqual(delay, full)

    def test_slots_are_independent_and_a_long_run_resets(self):
        """One slot's crash loop does not slow another; a worker that ran long restarts fast."""
        policy = RestartPolicy(random.Random(2))
        for _ in range(8):
            policy.delay(0, ran_for=0.1)
        self.assertLessEqual(policy.delay(1, ran_for=0.1), RESTART_BACKOFF_MIN)
        self.assertLessEqual(policy.delay(0, ran_for=RESTART_BACKOFF_RESET + 1), RESTART_BACKOFF_MIN)

    def test_reset_forgets(self):
        """After `reset` (a new generation serves) every slot starts at the minimum again."""
        policy = RestartPolicy(random.Random(3))
        for _ in range(8):
            policy.delay(0, ran_for=0.1)
        policy.reset()
        self.assertLessEqual(policy.delay(0, ran_for=0.1), RESTART_BACKOFF_MIN)

    @given(st.lists(st.tuples(st.integers(0, 3), st.floats(0, 100, allow_nan=False)), max_size=50))
    def test_always_bounded(self, deaths):
        """Whatever the history, a delay is positive and never above the cap."""
        policy = RestartPolicy(random.Random(0))
        for slot, ran_for in deaths:
            delay = policy.delay(slot, ran_for)
            self.assertGreater(delay, 0)
            self.assertLessEqual(delay, RESTART_BACKOFF_MAX)
