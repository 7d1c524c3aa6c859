"""The uniform-batch parser (relayd/counters/uniform.py): fast, and exactly ujson's answer or none.

test-case-name: tests.test_counters_uniform
"""

from __future__ import annotations

import unittest
from typing import List

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.codec import encode_envelope, encode_envelopes
from relayd.counters.aggregate import _PATTERNS, _aggregate_lean, _lean_patterns, aggregate_items, frame
from relayd.counters.uniform import parse_uniform

KEY, VALUE = ("key",), ("value",)
PATTERNS = _lean_patterns(KEY, VALUE)


def ingest_batch(n: int, value: int = 1, ts: float = 1_796_060_018.417325, first_id: int = 0) -> List[bytes]:
    """`n` envelopes as ingest writes one NDJSON request of increments (UUID keys, one ts)."""
    ids = ["%030x" % (first_id + i) for i in range(n)]
    bodies = [{"key": "00000000-0000-4000-8000-%012d" % (i % 7), "value": value} for i in range(n)]
    return encode_envelopes(ids, ts, "/increments", "application/json", bodies)


def assert_same_as_general(case: unittest.TestCase, items: List[bytes]) -> bool:
    """If the lean parser takes `items`, its batch equals the general parser's; True when it took them."""
    general = aggregate_items(items, KEY, VALUE)
    lean = _aggregate_lean(frame(items), KEY, VALUE)
    if lean is None:
        return False
    case.assertEqual(lean.id, general.id)
    case.assertEqual(lean.sums, general.sums)
    case.assertEqual(lean.counted, general.counted)
    case.assertEqual((lean.min_ts, lean.size, lean.dead), (general.min_ts, general.size, general.dead))
    case.assertEqual(lean.field_args(), _pairs(general.sums))
    return True


def _pairs(sums: dict) -> List[bytes]:  # type: ignore[type-arg]
    out: List[bytes] = []
    for k in sorted(sums):
        out += [k.encode("utf-8"), b"%d" % sums[k]]
    return out


ITEM_LENGTH = len(ingest_batch(1)[0])

#: Bytes a mutation writes: JSON structure, escapes, control characters, a UTF-8 lead byte, digits, signs.
MUTANTS = b'"\\{}[],:. -+eE0123456789abkvx\x00\x1f\x7f\xc3'


class UniformParserTests(unittest.TestCase):
    """`parse_uniform` takes the batches ingest writes and nothing that parses differently."""

    def test_takes_what_ingest_writes(self) -> None:
        """A batch of one request's increments (and of several requests, other ts) is cut at fixed offsets."""
        items = ingest_batch(50) + ingest_batch(50, ts=1_796_060_019.5, first_id=50)
        f = frame(items)
        columns = parse_uniform(f.body, f.lengths, PATTERNS)
        assert columns is not None
        self.assertEqual(columns.ids[3], b"%030x" % 3)
        self.assertEqual(columns.keys[3], b"00000000-0000-4000-8000-000000000003")
        self.assertEqual(set(columns.values), {b"1"})
        self.assertTrue(assert_same_as_general(self, items))

    def test_value_first_and_other_values(self) -> None:
        """Bodies written value first, and values other than 1 (same width), are taken and summed right."""
        items = [encode_envelope("%030x" % i, 5.25, "/i", None, {"value": 7 - (i % 3), "key": "k%d" % (i % 4)}) for i in range(40)]
        f = frame(items)
        self.assertIsNotNone(parse_uniform(f.body, f.lengths, PATTERNS))
        self.assertTrue(assert_same_as_general(self, items))

    def test_declines_what_is_not_uniform(self) -> None:
        """Items of different lengths, or of two routes, are left to the pattern scan (which still takes them)."""
        mixed_lengths = ingest_batch(3) + ingest_batch(3, value=10, first_id=3)
        two_routes = ingest_batch(3) + [
            encode_envelope("%030x" % (10 + i), 1_796_060_018.417325, "/increment", "application/json!",
                            {"key": "00000000-0000-4000-8000-00000000000%d" % i, "value": 1})
            for i in range(3)
        ]
        self.assertEqual(len(set(map(len, two_routes))), 1)
        for items in (mixed_lengths, two_routes):
            f = frame(items)
            self.assertIsNone(parse_uniform(f.body, f.lengths, PATTERNS))
            self.assertTrue(assert_same_as_general(self, items))

    def test_a_comma_inside_a_cut_field(self) -> None:
        """A value or ts holding a comma (same width) is not read as two numbers: the lean result, if any, is ujson's."""
        items = ingest_batch(4, value=123)
        items[2] = items[2].replace(b'"value":123', b'"value":1,2')
        assert_same_as_general(self, items)
        items = ingest_batch(4)
        items[2] = items[2].replace(b"1796060018.417325", b"1796060018,417325")
        assert_same_as_general(self, items)

    def test_odd_ts_shapes(self) -> None:
        """Integer, negative and leading-zero-free small ts go through the ts grammar; all agree with ujson."""
        for ts in (0.5, 60.0, 7.25):
            items = [encode_envelope("%030x" % i, ts, "/i", "t", {"key": "k", "value": 1}) for i in range(5)]
            self.assertTrue(assert_same_as_general(self, items))
        integer_ts = [b'{"id":"%030x","ts":%d,"route":"/i","content_type":null,"body":{"key":"k","value":1}}' % (i, 10 + i)
                      for i in range(5)]
        self.assertTrue(assert_same_as_general(self, integer_ts))
        negative = [b'{"id":"%030x","ts":-1.5,"route":"/i","content_type":null,"body":{"key":"k","value":1}}' % i for i in range(5)]
        self.assertTrue(assert_same_as_general(self, negative))
        leading_zero = negative[:2] + [negative[2].replace(b"-1.5", b"01.5")]
        self.assertFalse(assert_same_as_general(self, leading_zero))

    def test_ts_misfits_of_the_same_width(self) -> None:
        """A ts of the usual width with the point elsewhere, twice, missing, a sign or a leading zero: never read differently from ujson."""
        for ts in (b".1796060018417325", b"1796060018417325.", b"17960600184.17325", b"0796060018.417325",
                   b"1796060018.4173.5", b"1796060018e417325", b"-796060018.417325", b"1796060018.41732 "):
            self.assertEqual(len(ts), 17)
            items = ingest_batch(3)
            items[1] = items[1].replace(b"1796060018.417325", ts)
            assert_same_as_general(self, items)

    def test_every_byte_of_an_item_replaced(self) -> None:
        """Exhaustive: each byte of an item of a uniform batch replaced by each of `MUTANTS`: the lean result, if any, is exactly ujson's."""
        taken = 0
        for value, which in ((3, 1), (123, 1), (3, 0)):  # the middle item, and the first (whose layout is the batch's)
            for at in range(len(ingest_batch(1, value=value)[0])):
                for byte in MUTANTS:
                    items = ingest_batch(3, value=value)
                    items[which] = items[which][:at] + bytes([byte]) + items[which][at + 1 :]
                    taken += assert_same_as_general(self, items)
        self.assertGreater(taken, 100)  # the harmless replacements (a digit for a digit, ...) are still taken lean

    @settings(max_examples=400, deadline=None)
    @given(
        st.integers(1, 12),
        st.lists(st.tuples(st.integers(0, 11), st.sampled_from(range(ITEM_LENGTH)), st.sampled_from(MUTANTS)), min_size=1, max_size=3),
    )
    def test_same_length_mutations(self, n, mutations) -> None:  # type: ignore[no-untyped-def]
        """Any byte of a uniform batch replaced (length kept): the lean result, if any, is exactly ujson's."""
        items = ingest_batch(n, value=3)
        for i, at, byte in mutations:
            i %= n
            items[i] = items[i][:at] + bytes([byte]) + items[i][at + 1 :]
        assert_same_as_general(self, items)

    @settings(deadline=None)
    @given(st.integers(2, 8), st.integers(0, 10**6), st.integers(1, 14))
    def test_shifted_fields(self, n, where, shift) -> None:  # type: ignore[no-untyped-def]
        """An item of the same length whose fields sit at other offsets (shorter key, longer value) is counted right or left to the general parser."""
        items = ingest_batch(n)
        i = where % n
        items[i] = encode_envelope("%030x" % (100 + i), 1_796_060_018.417325, "/increments", "application/json",
                                   {"key": "x" * (36 - shift), "value": int("9" * (1 + shift))})
        self.assertEqual(len(set(map(len, items))), 1)
        f = frame(items)
        self.assertIsNone(parse_uniform(f.body, f.lengths, PATTERNS))
        self.assertTrue(assert_same_as_general(self, items))

    def test_patterns_are_the_lean_parsers(self) -> None:
        """The tests use the same (pattern, fixed) pairs as the parser."""
        _aggregate_lean(frame(ingest_batch(1)), KEY, VALUE)
        self.assertEqual(_PATTERNS[(KEY, VALUE)], PATTERNS)
