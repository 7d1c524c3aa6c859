"""relayd.schema: drafts by $schema, offline $ref resolution, one-line errors, formats, 400 details.

test-case-name: tests.test_schema
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import unittest
import uuid
from typing import Any, List

import jsonschema_rs
import ujson
from hypothesis import given
from hypothesis import strategies as st

from relayd.config import ConfigError
from relayd.ingest.problems import BadRequest, InvalidBatch, SchemaViolation
from relayd.ingest.validation import BodyParser
from relayd.schema import compile_schema, compile_schema_file
from relayd.schema.drafts import DEFAULT, DRAFT4, DRAFT7, DRAFT2019, DRAFT2020
from relayd.schema.formats import KNOWN_FORMATS
from relayd.schema.metaschemas import metaschema_resources
from tests.harness import RedisServer, RelaydProcess, wait_for
from tests.strategies import json_schemas, json_values

JSON = b"application/json"
NDJSON = b"application/x-ndjson"
KEY = "6f1c3c56-2f0a-4c1f-9e4b-2a1c5b9d8e7f"

#: The issue's 2020-12 schema: fastjsonschema accepted it and ignored all three keywords.
SCHEMA_2020 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {"a": {"type": "array", "prefixItems": [{"type": "integer"}]}, "b": {"type": "integer"}},
    "dependentRequired": {"b": ["a"]},
    "unevaluatedProperties": False,
}
#: Bodies SCHEMA_2020 forbids, with the field and keyword the 400 must name.
FORBIDDEN_2020 = [
    ({"a": ["x"], "b": 1}, "/a/0", "type"),  # prefixItems
    ({"b": 1, "zzz": 1}, "/", None),  # dependentRequired or unevaluatedProperties, whichever reports first
    ({"a": [1], "zzz": 1}, "/", "unevaluatedProperties"),
]


class TempDir:
    """A temporary schema directory, removed after the test."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.path = tempfile.mkdtemp(prefix="relayd-schema-")
        test.addCleanup(shutil.rmtree, self.path, True)

    def write(self, name: str, doc: Any) -> str:
        """Write `doc` (JSON unless a str) at `name` below the directory; return the path."""
        path = os.path.join(self.path, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(doc if isinstance(doc, str) else json.dumps(doc))
        return path


class AcceptRecorder:
    """A TCP listener on 127.0.0.1 that counts accepted connections (and answers a schema)."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepts = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        test.addCleanup(self.close)

    def _serve(self) -> None:
        body = b'{"type": "integer"}'
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepts += 1
            with conn:
                conn.settimeout(2.0)
                try:
                    conn.recv(4096)
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                except OSError:
                    pass

    def close(self) -> None:
        """Stop accepting."""
        self._stop = True
        self.sock.close()


def one_line_error(test: unittest.TestCase, path: str, *mentions: str) -> str:
    """Compile `path`; assert a one-line ConfigError naming each of `mentions`; return it."""
    with test.assertRaises(ConfigError) as e:
        compile_schema_file(path, "route[2].schema (route /leads)")
    message = str(e.exception)
    test.assertNotIn("\n", message)
    test.assertNotIn("Traceback", message)
    for word in ("route[2].schema", "/leads", *mentions):
        test.assertIn(word, message)
    return message


class DraftTests(unittest.TestCase):
    """The draft comes from $schema; 2020-12 without one; anything else is refused."""

    def test_draft_by_schema_uri(self) -> None:
        """Each supported $schema (with or without '#', http or https) selects its draft."""
        for uri, draft in [
            ("http://json-schema.org/draft-04/schema#", DRAFT4),
            ("http://json-schema.org/draft-07/schema", DRAFT7),
            ("https://json-schema.org/draft-07/schema#", DRAFT7),
            ("https://json-schema.org/draft/2019-09/schema", DRAFT2019),
            ("https://json-schema.org/draft/2020-12/schema", DRAFT2020),
        ]:
            with self.subTest(uri=uri):
                self.assertIs(compile_schema({"$schema": uri}).draft, draft)

    def test_default_is_2020_12(self) -> None:
        """Without $schema a schema is 2020-12: prefixItems applies."""
        schema = compile_schema({"prefixItems": [{"type": "integer"}]})
        self.assertIs(schema.draft, DEFAULT)
        self.assertIs(DEFAULT, DRAFT2020)
        self.assertFalse(schema.is_valid(["x"]))

    def test_draft_rules_are_the_drafts_own(self) -> None:
        """Draft 7 applies draft 7 semantics: array-form items, no prefixItems."""
        schema = compile_schema({"$schema": DRAFT7.uri, "items": [{"type": "integer"}], "prefixItems": [{"type": "string"}]})
        self.assertTrue(schema.is_valid([1]))
        self.assertFalse(schema.is_valid(["x"]))

    def test_unknown_draft_is_refused(self) -> None:
        """Draft 3, a typo or a custom meta-schema is a config error at /$schema, not a silent 2020-12."""
        tmp = TempDir(self)
        for uri in ("http://json-schema.org/draft-03/schema#", "https://json-schema.org/draft/2020-13/schema", 7):
            with self.subTest(uri=uri):
                one_line_error(self, tmp.write("s.json", {"$schema": uri}), "$schema", "at /$schema")

    def test_issue_schema_is_fully_applied(self) -> None:
        """The issue's 2020-12 schema refuses its three bodies, each 400 naming field and keyword."""
        parser = BodyParser(compile_schema(SCHEMA_2020))
        self.assertEqual(parser.parse(b'{"a": [1, "x"], "b": 2}', JSON).values, [{"a": [1, "x"], "b": 2}])
        for body, field, keyword in FORBIDDEN_2020:
            with self.subTest(body=body), self.assertRaises(SchemaViolation) as e:
                parser.parse(json.dumps(body).encode(), JSON)
            self.assertEqual(e.exception.extensions["field"], field)
            if keyword is not None:
                self.assertEqual(e.exception.extensions["keyword"], keyword)
            self.assertIn(e.exception.extensions["keyword"], e.exception.detail)


class OfflineRefTests(unittest.TestCase):
    """$ref resolves from the schema's directory and the bundled meta-schemas; never the network."""

    def setUp(self) -> None:
        """A schema directory per test."""
        self.tmp = TempDir(self)

    def test_remote_ref_opens_no_connection_and_fails_in_one_line(self) -> None:
        """A $ref to a local HTTP listener: config error naming the ref and its pointer; no accept.

        The same schema given to jsonschema-rs with its defaults does connect:
        proof that this listener would see relayd's connection if it made one.
        """
        listener = AcceptRecorder(self)
        url = f"http://127.0.0.1:{listener.port}/integer.json"
        for doc, pointer in [
            ({"properties": {"n": {"$ref": url}}}, "/properties/n/$ref"),
            ({"$schema": DRAFT7.uri, "definitions": {"x": {"$ref": url + "#/definitions/y"}}}, "/definitions/x/$ref"),
            ({"$schema": DRAFT2020.uri, "$dynamicRef": url + "#meta"}, "/$dynamicRef"),
            ({"$schema": f"http://127.0.0.1:{listener.port}/meta.json"}, "/$schema"),
        ]:
            with self.subTest(doc=doc):
                message = one_line_error(self, self.tmp.write("s.json", doc), f"at {pointer}")
                self.assertIn(str(listener.port), message)
        self.assertEqual(listener.accepts, 0, "relayd connected to the $ref's host")
        jsonschema_rs.validator_for({"$ref": url})  # library defaults: fetches
        self.assertEqual(listener.accepts, 1, "the listener did not see jsonschema-rs's own fetch")

    def test_meta_schema_refs_resolve_offline_across_drafts(self) -> None:
        """A 2020-12 schema may $ref the draft-07 and draft-04 meta-schemas (and vice versa)."""
        for doc in (
            {"$ref": "http://json-schema.org/draft-07/schema#"},
            {"$ref": "http://json-schema.org/draft-04/schema#"},
            {"$schema": DRAFT4.uri, "$ref": "https://json-schema.org/draft/2020-12/schema"},
            {"$ref": "https://json-schema.org/draft/2019-09/schema"},
        ):
            with self.subTest(doc=doc):
                schema = compile_schema(doc)
                self.assertTrue(schema.is_valid({"type": "string"}))
                self.assertFalse(schema.is_valid({"type": "no-such-type"}))

    def test_every_supported_meta_schema_is_bundled(self) -> None:
        """The meta-schemas (and 2019-09/2020-12 vocabularies) come from jsonschema-rs, no download."""
        uris = {uri for uri, _ in metaschema_resources()}
        for uri in (
            "http://json-schema.org/draft-04/schema", "http://json-schema.org/draft-06/schema",
            "http://json-schema.org/draft-07/schema", "https://json-schema.org/draft/2019-09/schema",
            "https://json-schema.org/draft/2020-12/schema", "https://json-schema.org/draft/2020-12/meta/core",
            "https://json-schema.org/draft/2020-12/meta/unevaluated", "https://json-schema.org/draft/2019-09/meta/core",
        ):
            self.assertIn(uri, uris)

    def test_relative_file_refs(self) -> None:
        """A relative $ref names a file below the schema's directory (subdirectories included)."""
        self.tmp.write("common/defs.json", {"$defs": {"pos": {"type": "integer", "minimum": 1}}})
        path = self.tmp.write("lead.json", {"properties": {"n": {"$ref": "common/defs.json#/$defs/pos"}}})
        schema = compile_schema_file(path, "route[0].schema")
        self.assertTrue(schema.is_valid({"n": 1}))
        self.assertFalse(schema.is_valid({"n": 0}))

    def test_refs_by_id_of_a_local_file(self) -> None:
        """An https $ref resolves to the local file that declares it as $id."""
        self.tmp.write("x/shared.json", {"$id": "https://schemas.example.com/shared.json", "type": "string"})
        path = self.tmp.write("lead.json", {"$ref": "https://schemas.example.com/shared.json"})
        schema = compile_schema_file(path, "route[0].schema")
        self.assertTrue(schema.is_valid("s"))
        self.assertFalse(schema.is_valid(1))

    def test_refs_relative_to_own_id_map_to_files(self) -> None:
        """With $id https://h/s/lead.json, $ref 'sub/b.json' is <dir>/sub/b.json (no $id needed there)."""
        self.tmp.write("sub/b.json", {"type": "boolean"})
        path = self.tmp.write("lead.json", {"$id": "https://h.example/s/lead.json", "$ref": "sub/b.json"})
        schema = compile_schema_file(path, "route[0].schema")
        self.assertTrue(schema.is_valid(True))
        self.assertFalse(schema.is_valid(1))

    def test_unresolvable_refs_fail_in_one_line(self) -> None:
        """Missing file, escaping the directory, missing pointer or anchor: one line with the $ref's place."""
        self.tmp.write("broken.json", "{nope")
        cases = [
            ({"properties": {"a": {"$ref": "nope.json"}}}, ["nope.json", "at /properties/a/$ref"]),
            ({"$ref": "../outside.json"}, ["outside", "at /$ref"]),
            ({"$ref": "file:///etc/hostname"}, ["outside", "at /$ref"]),
            ({"items": {"$ref": "#/$defs/missing"}}, ["/$defs/missing", "at /items/$ref"]),
            ({"$dynamicRef": "#nope"}, ["nope", "at /$dynamicRef"]),
            ({"$ref": "broken.json"}, ["not valid JSON", "at /$ref"]),
        ]
        for doc, mentions in cases:
            with self.subTest(doc=doc):
                one_line_error(self, self.tmp.write("s.json", doc), *mentions)

    def test_inline_schema_references_nothing_outside(self) -> None:
        """A schema compiled from a value (no file) cannot name files: one-line error."""
        with self.assertRaises(ConfigError) as e:
            compile_schema({"$ref": "other.json"}, "route[0].schema")
        self.assertIn("other.json", str(e.exception))


class SchemaErrorTests(unittest.TestCase):
    """Every broken schema file is one line naming route, file and pointer."""

    def test_broken_schemas(self) -> None:
        """Bad type, bad regex, unknown format, not JSON, not a schema: one line each, with where."""
        tmp = TempDir(self)
        cases = [
            ({"properties": {"a": {"type": "nope"}}}, ["at /properties/a/type"]),
            ({"properties": {"a": {"pattern": "(("}}}, ["regex", "at /properties/a/pattern"]),
            ({"patternProperties": {"((": {}}}, ["regex", "at /patternProperties"]),
            ({"properties": {"a": {"format": "credit-card"}}}, ["credit-card", "at /properties/a/format"]),
            ({"minimum": "1"}, ["at /minimum"]),
            ("{not json", ["not valid JSON"]),
            ("", ["not valid JSON"]),
            ("\xff", ["not valid JSON"]),
            ([1, 2], ["a JSON object or a boolean"]),
        ]
        for doc, mentions in cases:
            with self.subTest(doc=doc):
                one_line_error(self, tmp.write("s.json", doc), "s.json", *mentions)

    def test_missing_file(self) -> None:
        """A schema file that does not exist is one line naming it."""
        one_line_error(self, "/nonexistent/schema.json", "/nonexistent/schema.json")

    def test_property_named_format_and_data_keywords(self) -> None:
        """A property called "format", or "format" inside enum/const/default data, is no format keyword."""
        compile_schema({"type": "object", "properties": {"format": {"type": "string"}}})
        compile_schema({"enum": [{"format": "credit-card"}], "default": {"format": "x"}})


class FormatTests(unittest.TestCase):
    """format is asserted in every draft; drafts lacking a known format borrow 2020-12's."""

    def test_uuid_in_every_draft(self) -> None:
        """format uuid refuses non-UUIDs under drafts 4, 6, 7, 2019-09 and 2020-12."""
        for uri in ("http://json-schema.org/draft-04/schema#", "http://json-schema.org/draft-06/schema#",
                    DRAFT7.uri, DRAFT2019.uri, DRAFT2020.uri):
            with self.subTest(uri=uri):
                schema = compile_schema({"$schema": uri, "format": "uuid"})
                self.assertTrue(schema.is_valid(KEY))
                self.assertTrue(schema.is_valid(KEY.upper()))
                self.assertFalse(schema.is_valid(KEY.replace("-", "")))
                self.assertFalse(schema.is_valid(KEY + "\n"))
                self.assertTrue(schema.is_valid(5), "format applies to strings only")

    def test_every_known_format_compiles_in_every_draft(self) -> None:
        """Each documented format is known (and asserted) whatever the draft."""
        for uri in ("http://json-schema.org/draft-04/schema#", DRAFT7.uri, DRAFT2020.uri):
            for name in KNOWN_FORMATS:
                with self.subTest(uri=uri, format=name):
                    self.assertFalse(compile_schema({"$schema": uri, "format": name}).is_valid("\x00 not \x01 valid ["))

    def test_strictness_examples(self) -> None:
        """The strictness docs/configuration.md promises, one example each way."""
        cases = {
            "email": (["a@example.com", "a@[127.0.0.1]"], ["Name <a@example.com>", "a..b@example.com", "no-at"]),
            "date-time": (["2024-02-29T12:00:00Z", "2024-01-01T00:00:00+01:00"], ["2024-01-01 00:00:00Z", "2024-01-01T00:00:00", "2023-02-29T00:00:00Z"]),
            "ipv4": (["192.0.2.1"], ["192.0.2.01", "1.2.3"]),
            "ipv6": (["2001:db8::1"], ["12345::"]),
            "uri": (["https://example.com/x?y#z", "urn:isbn:0451450523"], ["relative/path", "http://a b"]),
        }
        for name, (good, bad) in cases.items():
            schema = compile_schema({"format": name})
            for value in good:
                self.assertTrue(schema.is_valid(value), f"{name}: {value!r} should pass")
            for value in bad:
                self.assertFalse(schema.is_valid(value), f"{name}: {value!r} should fail")


class ViolationDetailTests(unittest.TestCase):
    """A 400 names the field (an RFC 6901 pointer) and the keyword; its detail stays bounded."""

    def test_pointer_escapes_and_keyword(self) -> None:
        """A property named 'a/b~c' is /a~1b~0c; the keyword is the one that failed."""
        parser = BodyParser(compile_schema({"properties": {"a/b~c": {"type": "string"}}}))
        with self.assertRaises(SchemaViolation) as e:
            parser.parse(b'{"a/b~c": 1}', JSON)
        self.assertEqual(e.exception.extensions["field"], "/a~1b~0c")
        self.assertEqual(e.exception.extensions["keyword"], "type")
        self.assertEqual(e.exception.extensions["schema_path"], "/properties/a~1b~0c/type")

    def test_ref_keyword_is_the_target_keyword(self) -> None:
        """A violation behind a $ref names the keyword that failed, not '$ref'."""
        parser = BodyParser(compile_schema({"$defs": {"p": {"minimum": 1}}, "properties": {"v": {"$ref": "#/$defs/p"}}}))
        with self.assertRaises(SchemaViolation) as e:
            parser.parse(b'{"v": 0}', JSON)
        self.assertEqual((e.exception.extensions["field"], e.exception.extensions["keyword"]), ("/v", "minimum"))

    def test_detail_is_bounded(self) -> None:
        """A 1 MB string that fails is not echoed back whole."""
        parser = BodyParser(compile_schema({"type": "integer"}))
        with self.assertRaises(SchemaViolation) as e:
            parser.parse(json.dumps("x" * 1_000_000).encode(), JSON)
        self.assertLess(len(e.exception.detail), 400)

    def test_ndjson_lines_name_field_and_keyword(self) -> None:
        """Bad NDJSON lines on a schema route carry the field and keyword in their line reports."""
        parser = BodyParser(compile_schema(SCHEMA_2020))
        with self.assertRaises(InvalidBatch) as e:
            parser.parse(b'{"a": [1]}\n{"a": ["x"]}\n{"a": [1], "q": 1}\n', NDJSON)
        self.assertEqual(e.exception.extensions["lines"], [2, 3])
        self.assertIn("line 2: /a/0:", e.exception.detail)
        self.assertIn("unevaluatedProperties", e.exception.detail)


def hostile_values() -> st.SearchStrategy:
    """JSON texts that parse (leniently, as ujson does) to values a validator may choke on."""
    return st.sampled_from([
        b'{"n": 1e999}', b'{"n": -1e999}', b'{"n": ' + b"9" * 4000 + b"}", b'{"n": -' + b"9" * 4000 + b"}",
        b'{"s": "\\ud800"}', b'{"\\udfff": 1}', b'["\\ud800\\ud800"]', b'{"n": 1.0}', b'{"n": 1e308}',
        b"[" * 60 + b"]" * 60, b'{"n": 18446744073709551616}', b'{"n": -9223372036854775809}',
    ])


class HostileValueTests(unittest.TestCase):
    """On schema routes, values at JSON's edges are a 200 or a 4xx problem, never an exception."""

    SCHEMAS: List[Any] = [
        {"type": "object", "additionalProperties": {"type": "number"}},
        {"type": ["object", "array"], "items": {"type": "string", "maxLength": 3}, "additionalProperties": {"type": "integer", "minimum": 0}},
        {"$ref": "#/$defs/any", "$defs": {"any": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/any"}}, {"type": "object"}, {"type": "string"}]}}},
        True,
    ]

    @given(body=hostile_values(), which=st.integers(0, 3), ndjson=st.booleans())
    def test_edges_are_200_or_4xx(self, body: bytes, which: int, ndjson: bool) -> None:
        """ujson's lenient values (inf, huge ints, lone surrogates, deep nesting) never escape as exceptions."""
        parser = BodyParser(compile_schema(self.SCHEMAS[which]))
        try:
            parsed = parser.parse(body + b"\n" + body if ndjson else body, NDJSON if ndjson else JSON)
        except (SchemaViolation, BadRequest, InvalidBatch):
            return
        self.assertTrue(parsed.values)

    def test_lone_surrogate_is_400_not_500(self) -> None:
        """A lone surrogate the validator must encode (pattern, a key) is refused like the encoder refuses it."""
        for schema, body in [({"items": {"pattern": "a"}}, b'["\\ud800"]'), ({"additionalProperties": {}}, b'{"\\ud800": 1}')]:
            with self.subTest(body=body), self.assertRaises(BadRequest) as e:
                BodyParser(compile_schema(schema)).parse(body, JSON)
            self.assertIn("strict JSON", e.exception.detail)


class RouteSchemaProperties(unittest.TestCase):
    """The hot path's yes/no and the 400's explanation always agree; no schema value escapes as a crash."""

    @given(json_schemas(), json_values(max_leaves=8))
    def test_any_schema_compiles_or_is_one_config_line(self, schema: Any, value: Any) -> None:
        """Any JSON value as a schema compiles or is one ConfigError line; a compiled one judges any body."""
        try:
            compiled = compile_schema(schema, "route[0].schema")
        except ConfigError as e:
            self.assertNotIn("\n", str(e))
            return
        try:
            parsed = BodyParser(compiled).parse(json.dumps(value).encode(), JSON)
        except SchemaViolation as e:
            self.assertTrue(e.extensions["field"].startswith("/"))
            return
        self.assertEqual(len(parsed.values), 1)

    @given(st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
        max_leaves=10,
    ))
    def test_is_valid_iff_no_violation(self, value: Any) -> None:
        """For any JSON value, is_valid(value) is exactly `violation(value) is None` (issue schema)."""
        schema = compile_schema(SCHEMA_2020)
        self.assertEqual(schema.is_valid(value), schema.violation(value) is None)

    @given(st.uuids(), st.integers(1, 2**62))
    def test_increment_round_trip(self, key: uuid.UUID, value: int) -> None:
        """The shipped increment schema (draft 7 + uuid) passes every valid increment through BodyParser."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        parser = BodyParser(compile_schema_file(os.path.join(root, "etc/schemas/increment.json"), "schema"))
        message = {"key": str(key), "value": value}
        self.assertEqual(parser.parse(ujson.dumps(message).encode(), JSON).values, [message])


class SchemaRouteIntegrationTests(unittest.TestCase):
    """The real daemon (twistd -n relayd) with a 2020-12 schema route and a remote-$ref config."""

    def test_2020_12_route_and_remote_ref_config(self) -> None:
        """Through twistd: the issue's three bodies are 400s naming field+keyword, nothing enqueued, a
        valid body lands; a config whose schema $refs a local listener exits non-zero with one
        stderr line and the listener sees no connection."""
        redis = RedisServer(self)
        relayd = RelaydProcess(
            self,
            routes=[{"path": "/t", "list": "t", "schema": "schemas/t.json"}],
            redis_url=redis.url,
            files={"schemas/t.json": SCHEMA_2020},
        )
        for body, field, keyword in FORBIDDEN_2020:
            code, headers, raw = relayd.post("/t", json.dumps(body).encode(), {"Content-Type": "application/json"})
            self.assertEqual(code, 400, raw)
            self.assertEqual(headers.get("content-type", "").split(";")[0], "application/problem+json")
            doc = json.loads(raw)
            self.assertEqual(doc["field"], field, doc)
            self.assertIn(doc["keyword"], doc["detail"])
            if keyword is not None:
                self.assertEqual(doc["keyword"], keyword, doc)
        code, _, raw = relayd.post("/t", b'{"a": [1, "x"], "b": 2}', {"Content-Type": "application/json"})
        self.assertEqual(code, 200, raw)
        wait_for(lambda: redis.llen("t") == 1, 10.0, "the valid message in Redis")
        self.assertEqual(ujson.loads(redis.items("t")[0])["body"], {"a": [1, "x"], "b": 2})

        listener = AcceptRecorder(self)
        bad = RelaydProcess(
            self,
            routes=[{"path": "/r", "list": "r", "schema": "schemas/r.json"}],
            redis_url=redis.url,
            files={"schemas/r.json": {"properties": {"n": {"$ref": f"http://127.0.0.1:{listener.port}/n.json"}}}},
            wait_ready=False,
        )
        code = bad.wait()
        self.assertNotEqual(code, 0)
        stderr = bad.stderr_text()
        lines = [line for line in stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, stderr)
        self.assertNotIn("Traceback", stderr)
        for word in ("route[0].schema", "/r", "r.json", "/properties/n/$ref", str(listener.port)):
            self.assertIn(word, lines[0])
        self.assertEqual(listener.accepts, 0, "relayd connected to the $ref's host")


if __name__ == "__main__":  # pragma: no cover
    unittest.main()
