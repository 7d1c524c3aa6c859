"""Body parsing and schema validation per route."""

from __future__ import annotations

import json
import os
import unittest
import uuid

import ujson
from hypothesis import given
from hypothesis import strategies as st

from relayd.config import ConfigError
from relayd.ingest.problems import (
    BadRequest,
    InvalidBatch,
    MalformedJSON,
    PayloadTooLarge,
    SchemaViolation,
    UnsupportedMediaType,
)
from relayd.ingest.validation import BodyParser, compile_schema, compile_schema_file
from tests.strategies import json_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCREMENT = compile_schema_file(os.path.join(ROOT, "etc/schemas/increment.json"), "schema")
JSON = b"application/json"
NDJSON = b"application/x-ndjson"


def increments():
    """Valid increment messages."""
    return st.builds(lambda u, v: {"key": str(u), "value": v}, st.uuids(), st.integers(1, 2**62))


class IncrementSchemaTests(unittest.TestCase):
    """The seed's increment rules: UUID key, value >= 1, nothing else."""

    parser = BodyParser(INCREMENT)

    @given(increments())
    def test_valid_increments_pass(self, message):
        """Every valid increment parses to itself."""
        parsed = self.parser.parse(ujson.dumps(message).encode(), JSON)
        self.assertEqual(parsed.values, [message])
        self.assertFalse(parsed.batch)

    def test_each_violation_names_the_field(self):
        """Each rule violation is a 400 whose detail and field name the culprit."""
        key = str(uuid.uuid4())
        cases = [
            ({"key": "not-a-uuid", "value": 1}, "/key"),
            ({"key": key, "value": 0}, "/value"),
            ({"key": key, "value": "1"}, "/value"),
            ({"key": key, "value": 1.5}, "/value"),
            ({"key": key, "value": True}, "/value"),
            ({"key": key, "value": 1, "extra": 1}, "/"),
            ({"value": 1}, "/"),
            ([1], "/"),
        ]
        for message, field in cases:
            with self.subTest(message=message), self.assertRaises(SchemaViolation) as e:
                self.parser.parse(json.dumps(message).encode(), JSON)
            self.assertEqual(e.exception.extensions["field"], field)
            self.assertEqual(e.exception.status, 400)
        with self.assertRaises(SchemaViolation) as e:
            self.parser.parse(json.dumps({"key": key, "value": 1, "extra": 1}).encode(), JSON)
        self.assertIn("extra", e.exception.detail)

    def test_malformed_json(self):
        """Broken JSON is 400 malformed-json, even without a Content-Type."""
        for ctype in (JSON, None, b"application/vnd.x+json"):
            with self.subTest(ctype=ctype), self.assertRaises(MalformedJSON):
                self.parser.parse(b'{"key": ', ctype)

    def test_schema_route_refuses_other_media_types(self):
        """A schema route is JSON-only: 415 for XML or form bodies."""
        for ctype in (b"application/xml", b"text/plain", b"application/x-www-form-urlencoded"):
            with self.subTest(ctype=ctype), self.assertRaises(UnsupportedMediaType):
                self.parser.parse(b"<x/>", ctype)


class BatchTests(unittest.TestCase):
    """NDJSON batches are all or nothing and name bad lines."""

    parser = BodyParser(INCREMENT)

    @given(st.lists(increments(), min_size=1, max_size=30), st.data())
    def test_bad_lines_are_all_named(self, messages, data):
        """Whatever lines are broken, the 400 lists exactly their numbers."""
        lines = [json.dumps(m).encode() for m in messages]
        bad = data.draw(st.sets(st.integers(1, len(lines)), max_size=len(lines)))
        for n in bad:
            lines[n - 1] = data.draw(st.sampled_from([b"{", b'{"key": "x", "value": 1}', b"[]", b"nan"]))
        body = b"\n".join(lines) + b"\n"
        if not bad:
            parsed = self.parser.parse(body, NDJSON)
            self.assertEqual(parsed.values, messages)
            self.assertTrue(parsed.batch)
            return
        with self.assertRaises(InvalidBatch) as e:
            self.parser.parse(body, NDJSON)
        self.assertEqual(e.exception.extensions["lines"], sorted(bad)[:20])
        self.assertEqual(e.exception.extensions["invalid_count"], len(bad))

    def test_blank_lines_and_crlf(self):
        """Blank lines are skipped but still counted in line numbers."""
        body = b'{"a":1}\r\n\r\n\n{"b":2}\r\nbad\n'
        with self.assertRaises(InvalidBatch) as e:
            BodyParser(None).parse(body, NDJSON)
        self.assertEqual(e.exception.extensions["lines"], [5])

    def test_empty_batch(self):
        """A batch with no messages is a 400, not an empty success."""
        with self.assertRaises(InvalidBatch):
            BodyParser(None).parse(b"\n \n", NDJSON)

    def test_raw_lines_ride_along(self):
        """format=body routes push each line's bytes untouched."""
        parsed = BodyParser(None).parse(b'{"a": 1}\n{"b":2}', NDJSON)
        self.assertEqual(parsed.raws, [b'{"a": 1}', b'{"b":2}'])


class SchemaLessTests(unittest.TestCase):
    """Routes without a schema relay text as strings and JSON as values."""

    parser = BodyParser(None)

    @given(json_values())
    def test_json_values(self, value):
        """Any JSON value posted as JSON comes back as that value."""
        parsed = self.parser.parse(json.dumps(value).encode(), JSON)
        self.assertEqual(parsed.values, [json.loads(json.dumps(value))])

    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=50))
    def test_text_is_relayed_as_string(self, text):
        """text/plain bodies are strings, whatever they contain."""
        parsed = self.parser.parse(text.encode("utf-8"), b"text/plain; charset=utf-8")
        self.assertEqual(parsed.content_type, "text/plain")
        self.assertEqual(parsed.values, [text])

    def test_no_content_type_sniffs(self):
        """Without Content-Type, JSON is JSON and anything else is text."""
        self.assertEqual(self.parser.parse(b'{"a":1}', None).values, [{"a": 1}])
        self.assertEqual(self.parser.parse(b"hello", None).values, ["hello"])

    def test_invalid_utf8_text(self):
        """Text that is not UTF-8 cannot become a JSON string: 400."""
        with self.assertRaises(BadRequest):
            self.parser.parse(b"\xff\xfe", b"text/plain")


class CompileSchemaTests(unittest.TestCase):
    """Schemas are checked when the config loads."""

    def test_unknown_format_rejected(self):
        """A format the validator does not know (and would let pass) is a config error."""
        with self.assertRaises(ConfigError) as e:
            compile_schema({"type": "string", "format": "credit-card"}, "route[0].schema")
        self.assertIn("credit-card", str(e.exception))

    def test_property_named_format_is_fine(self):
        """A property called "format" is not a format keyword."""
        compile_schema({"type": "object", "properties": {"format": {"type": "string"}}})

    def test_invalid_schema(self):
        """A broken schema document names the key."""
        with self.assertRaises(ConfigError) as e:
            compile_schema({"type": "no-such-type"}, "route[3].schema")
        self.assertIn("route[3].schema", str(e.exception))


class MaxLinesTests(unittest.TestCase):
    """The NDJSON line cap counts lines, not newline characters."""

    def test_trailing_newline_is_not_a_line(self):
        """Exactly max_lines lines pass with or without a final newline; one more is 413."""
        parser = BodyParser(None, max_lines=3)
        self.assertEqual(len(parser.parse(b"1\n2\n3\n", NDJSON).values), 3)
        self.assertEqual(len(parser.parse(b"1\n2\n3", NDJSON).values), 3)
        with self.assertRaises(PayloadTooLarge):
            parser.parse(b"1\n2\n3\n4\n", NDJSON)


class NdjsonFastPathTests(unittest.TestCase):
    """The map-based fast path gives exactly what the line-by-line path gives."""

    @given(
        st.lists(
            st.one_of(
                st.builds(lambda u, v: json.dumps({"key": str(u), "value": v}).encode(), st.uuids(), st.integers(-2, 5)),
                st.sampled_from([b"", b" ", b"{", b"[1", b"2]", b"1,2", b"NaN", b"[[[[[[1]]]]]]", b'{"key": 1}\r']),
            ),
            min_size=1,
            max_size=12,
        ),
        st.booleans(),
        st.booleans(),
    )
    def test_same_result_as_line_by_line(self, lines, trailing, schema):
        """For any batch, both paths accept the same values or refuse with the same lines."""
        parser = BodyParser(INCREMENT if schema else None, max_depth=4)
        body = b"\n".join(lines) + (b"\n" if trailing else b"")

        def outcome(parse):
            try:
                p = parse(body)
                return ("ok", repr(p.values), p.raws)  # repr: NaN != NaN
            except (InvalidBatch, PayloadTooLarge) as e:
                return ("error", type(e), e.extensions.get("lines"))

        self.assertEqual(outcome(parser._parse_ndjson), outcome(parser._parse_ndjson_lines))
