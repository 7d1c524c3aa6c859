"""Envelope encoding and NDJSON splitting."""

from __future__ import annotations

import json
import unittest

from hypothesis import given
from hypothesis import strategies as st

from relayd.codec import EncodeError, decode_envelope, encode_envelope, encode_envelopes, split_ndjson
from tests.strategies import json_values


class EnvelopeTests(unittest.TestCase):
    """The envelope is strict JSON and round-trips."""

    @given(json_values(), st.floats(0, 2e9, allow_nan=False), st.text(min_size=1, max_size=10))
    def test_round_trip(self, body, ts, route):
        """decode(encode(x)) gives back every field; the stdlib parser agrees."""
        item = encode_envelope("id1", ts, "/" + route, "application/json", body)
        env = decode_envelope(item)
        strict = json.loads(item.decode("utf-8"))
        self.assertEqual(env, strict)
        self.assertEqual(env["id"], "id1")
        self.assertEqual(env["route"], "/" + route)
        self.assertEqual(env["body"], json.loads(json.dumps(body)))
        self.assertAlmostEqual(env["ts"], ts, delta=1e-6)  # microsecond precision

    def test_rejects_nan_and_surrogates(self):
        """Values without a strict JSON form are refused, not pushed."""
        for body in (float("nan"), float("inf"), {"a": "\ud800"}):
            with self.subTest(body=body), self.assertRaises(EncodeError):
                encode_envelope("id", 1.0, "/r", None, body)

    @given(
        st.lists(
            st.one_of(
                st.dictionaries(st.sampled_from(["a", "},{", "b}", "{c"]), json_values(), max_size=4),
                json_values(),
            ),
            max_size=12,
        ),
        st.sampled_from(["/r", "/r%s", "/%%"]),
    )
    def test_batch_equals_one_by_one(self, bodies, route):
        """A batch's envelopes are byte for byte those encoded one at a time.

        Batches of objects take the one-ujson-call path (`_encode_objects`),
        which cuts the list at its ``},{`` boundaries; strings and nested
        objects holding ``},{`` must send it back to the per-body path.
        """
        ids = ["%030x" % i for i in range(len(bodies))]
        try:
            expected = [encode_envelope(i, 7.25, route, "application/json", b) for i, b in zip(ids, bodies)]
        except EncodeError:
            with self.assertRaises(EncodeError):
                encode_envelopes(ids, 7.25, route, "application/json", bodies)
            return
        self.assertEqual(encode_envelopes(ids, 7.25, route, "application/json", bodies), expected)

    def test_batch_refuses_what_one_by_one_refuses(self):
        """NaN or a lone surrogate in one object of a batch: EncodeError, as for a single body."""
        for bad in ({"x": float("nan")}, {"x": "\ud800"}, {"x": [float("inf")]}):
            bodies = [{"a": i} for i in range(6)] + [bad]
            with self.subTest(bad=bad), self.assertRaises(EncodeError):
                encode_envelopes(["%030x" % i for i in range(7)], 1.0, "/r", None, bodies)

    def test_decode_rejects_other_json(self):
        """A JSON value that is not an envelope is an error."""
        with self.assertRaises(ValueError):
            decode_envelope(b'{"id": 1}')


class NdjsonTests(unittest.TestCase):
    """Splitting keeps line numbers the sender can see."""

    @given(st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")), max_size=20), st.booleans())
    def test_split_matches_lines(self, lines, crlf):
        """Non-blank lines come back in order with their 1-based numbers."""
        sep = b"\r\n" if crlf else b"\n"
        body = sep.join(lines)
        got = dict(split_ndjson(body))
        self.assertEqual(sorted(got), [n for n, line in enumerate(lines, 1) if line.strip()])
        for n, line in got.items():
            original = lines[n - 1]
            if not crlf or n == len(lines):
                original = original[:-1] if original.endswith(b"\r") else original
            self.assertEqual(line, original)
