"""Message ids: unique and time-ordered within a process."""

from __future__ import annotations

import unittest

from hypothesis import given
from hypothesis import strategies as st

from relayd.ids import IdGenerator


class IdGeneratorTests(unittest.TestCase):
    """Ids sort in generation order whatever the wall clock does."""

    @given(
        st.lists(
            st.tuples(st.floats(0, 2e9, allow_nan=False), st.integers(1, 5)), min_size=1, max_size=50
        )
    )
    def test_sorted_unique_under_any_clock(self, steps):
        """Even with a clock that jumps backwards, ids are unique and ascending."""
        times = iter([t for t, _ in steps])
        now = [0.0]

        def clock():
            return now[0]

        gen = IdGenerator(clock, node=0xABCDEF01)
        ids = []
        for t, count in steps:
            now[0] = t
            ids.extend([gen.next_id()] if count == 1 else gen.next_ids(count))
        del times
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(sorted(ids), ids)
        self.assertTrue(all(len(i) == 30 for i in ids))

    def test_time_prefix(self):
        """The first 12 hex digits are the millisecond timestamp."""
        gen = IdGenerator(lambda: 1700000000.1234, node=1)
        self.assertEqual(int(gen.next_id()[:12], 16), 1700000000123)

    def test_distinct_nodes(self):
        """Two generators with random nodes do not collide on the same clock."""
        a, b = IdGenerator(lambda: 1.0), IdGenerator(lambda: 1.0)
        self.assertNotEqual(a.next_id(), b.next_id())
