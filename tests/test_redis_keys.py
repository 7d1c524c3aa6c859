"""Tests of relayd.redis.keys: hash tags, companion keys, slots.

test-case-name: tests.test_redis_keys
"""

import unittest

from hypothesis import given
from hypothesis import strategies as st

from relayd.redis.keys import companion, crc16, hash_tag, key_slot


class KeySlotTests(unittest.TestCase):
    """Slots agree with Redis Cluster's definition."""

    def test_reference_vectors(self) -> None:
        """CRC16/XMODEM of "123456789" is 0x31C3 (the Redis Cluster spec's check value)."""
        self.assertEqual(crc16(b"123456789"), 0x31C3)

    def test_known_slots(self) -> None:
        """Slots that `CLUSTER KEYSLOT` gives for these keys."""
        self.assertEqual(key_slot(b"foo"), 12182)
        self.assertEqual(key_slot(b"{user1000}.following"), key_slot(b"{user1000}.followers"))
        self.assertEqual(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"))
        self.assertEqual(hash_tag(b"foo{}{bar}"), b"foo{}{bar}")  # empty first tag: whole key
        self.assertEqual(hash_tag(b"foo{{bar}}zap"), b"{bar")

    @given(st.binary(max_size=40), st.lists(st.binary(min_size=1, max_size=10), max_size=3))
    def test_companion_shares_the_slot(self, key: bytes, parts: list) -> None:
        """A companion key always hashes to its key's slot (or is refused, never wrong)."""
        try:
            name = companion(key, *parts)
        except ValueError:
            self.assertTrue(key == b"" or b"}" in key)
            self.assertEqual(hash_tag(key), key)
            return
        self.assertEqual(key_slot(name), key_slot(key))

    def test_companion_names(self) -> None:
        """Plain keys get wrapped in a tag; tagged keys keep theirs."""
        self.assertEqual(companion(b"leads", b"processing", b"p1"), b"{leads}:processing:p1")
        self.assertEqual(companion(b"{shop}:leads", b"dead"), b"{shop}:leads:dead")
