"""Message targets and their spool encoding.

test-case-name: tests.test_targets
"""

from __future__ import annotations

import unittest

from hypothesis import given
from hypothesis import strategies as st

from relayd.outbox.targets import ListTarget, decode_payload, encode_payload, group_by_target
from relayd.spool.record import decode_entry, encode_entry


class SpoolEncodingTests(unittest.TestCase):
    """Targets round-trip through spool payloads, compatible with older spools."""

    @given(st.binary(max_size=300), st.binary(max_size=2000))
    def test_round_trip(self, key: bytes, item: bytes) -> None:
        """decode(encode(t, item)) == (t, item) for any bytes."""
        self.assertEqual(decode_payload(encode_payload(ListTarget(key), item)), (ListTarget(key), item))

    @given(st.binary(max_size=300), st.binary(max_size=2000))
    def test_list_payload_is_the_old_entry_format(self, key: bytes, item: bytes) -> None:
        """A list target's payload is byte-for-byte the pre-target spool entry: old spools replay."""
        self.assertEqual(encode_payload(ListTarget(key), item), encode_entry(key, item))
        self.assertEqual(decode_entry(encode_payload(ListTarget(key), item)), (key, item))

    def test_malformed_payloads(self) -> None:
        """Short, overrunning or unknown-kind payloads raise ValueError."""
        for bad in (b"", b"\x01\x00", b"\x09\x00\x00\x00abc", b"\x00\x00\x00\x05k"):
            with self.assertRaises(ValueError):
                decode_payload(bad)

    def test_list_commands(self) -> None:
        """A list target is one multi-value LPUSH."""
        self.assertEqual(ListTarget(b"k").commands([b"1", b"2"]), [(b"LPUSH", b"k", b"1", b"2")])

    @given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.binary(max_size=5))))
    def test_grouping_keeps_order_per_target(self, pairs) -> None:  # type: ignore[no-untyped-def]
        """group_by_target keeps each target's items in arrival order."""
        groups = group_by_target([(ListTarget(k), v) for k, v in pairs])
        for key in (b"a", b"b", b"c"):
            self.assertEqual(groups.get(ListTarget(key), []), [v for k, v in pairs if k == key])
