"""The reply reader's packed take (relayd/reply/take.py) against a real Redis.

test-case-name: tests.test_reply_take
"""

from __future__ import annotations

import unittest
from typing import List

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.reply.take import TAKE_PACKED, unpack_replies
from tests.harness import RedisServer


class PackedTakeTests(unittest.TestCase):
    """TAKE_PACKED pops what RPOP <count> would pop, as one string that unpacks to the same items."""

    @classmethod
    def setUpClass(cls) -> None:
        cls._case = unittest.TestCase()
        cls.redis = RedisServer(cls._case)

    @classmethod
    def tearDownClass(cls) -> None:
        cls._case.doCleanups()

    def take(self, count: int) -> List[bytes]:
        """Run the script by EVAL (what `Script.run` falls back to) and unpack its answer."""
        return unpack_replies(self.redis.command("EVAL", TAKE_PACKED.source, 1, "replies", count))

    def test_empty_list_is_nil(self) -> None:
        """Nothing there: nil (the reader then blocks in BRPOP), which unpacks to no items."""
        self.redis.command("DEL", "replies")
        self.assertIsNone(self.redis.command("EVAL", TAKE_PACKED.source, 1, "replies", 10))
        self.assertEqual(self.take(10), [])

    def test_takes_at_most_count_oldest_first(self) -> None:
        """LPUSHed a..e, a take of 3 gets a, b, c (RPOP order) and leaves d, e."""
        self.redis.command("DEL", "replies")
        self.redis.command("LPUSH", "replies", "a", "b", "c", "d", "e")
        self.assertEqual(self.take(3), [b"a", b"b", b"c"])
        self.assertEqual(self.take(256), [b"d", b"e"])
        self.assertEqual(self.redis.command("EXISTS", "replies"), 0)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.binary(max_size=300), min_size=1, max_size=40))
    def test_any_bytes_round_trip(self, items: List[bytes]) -> None:
        """Binary items (colons, digits, CR/LF, empty ones included) come back byte for byte, in order."""
        self.redis.command("DEL", "replies")
        self.redis.command("LPUSH", "replies", *items)
        self.assertEqual(self.take(len(items)), items)
