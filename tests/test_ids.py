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

    @given(st.integers(0, (1 << 40) - 1), st.integers(1, 10_000), st.integers(0, 0xFFFFFFFF))
    def test_batch_ids_are_the_per_id_format(self, seq, count, node):
        """`next_ids` (a head plus precomputed suffixes) gives exactly the ids formatted one by one, across
        4096-blocks and the 40-bit wrap."""
        gen = IdGenerator(lambda: 1700000000.5, node=node)
        gen._seq = seq
        expected = ["%012x%08x%010x" % (1700000000500, node, (seq + i) & ((1 << 40) - 1)) for i in range(1, count + 1)]
        self.assertEqual(gen.next_ids(count), expected)
        self.assertEqual(gen.next_id(), "%012x%08x%010x" % (1700000000500, node, (seq + count + 1) & ((1 << 40) - 1)))

    def test_time_prefix(self):
        """The first 12 hex digits are the millisecond timestamp."""
        gen = IdGenerator(lambda: 1700000000.1234, node=1)
        self.assertEqual(int(gen.next_id()[:12], 16), 1700000000123)

    def test_distinct_nodes(self):
        """Two generators with random nodes do not collide on the same clock."""
        a, b = IdGenerator(lambda: 1.0), IdGenerator(lambda: 1.0)
        self.assertNotEqual(a.next_id(), b.next_id())
