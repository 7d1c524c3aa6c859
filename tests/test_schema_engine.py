"""relayd/schema/engine.py: a draft 6/7 schema runs on the 2020-12 class only where that gives the draft's answers.

test-case-name: tests.test_schema_engine
"""

from __future__ import annotations

import json
import os
import unittest
import uuid
from typing import Any, List

import jsonschema_rs
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.schema import compile_schema, compile_schema_file
from relayd.schema.drafts import DRAFT6, DRAFT7, DRAFT2020
from relayd.schema.engine import _same, engine_for, without_schema_uri
from relayd.schema.formats import borrowed_formats
from tests.strategies import json_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE_DRAFT7 = os.path.join(ROOT, "tests", "data", "json-schema-test-suite", "draft7")
INCREMENT = os.path.join(ROOT, "etc", "schemas", "increment.json")
BORROWED_7 = borrowed_formats(DRAFT7)


def own_draft_validator(schema: Any) -> Any:
    """`schema` compiled by its draft's own class, as relayd did before engine.py (borrowed formats as callbacks)."""
    return DRAFT7.validator_cls(schema, formats=BORROWED_7 or None, validate_formats=True, ignore_unknown_formats=False)


class EngineChoiceTests(unittest.TestCase):
    """Which schemas are promoted."""

    def test_increment_schema_runs_on_2020_12(self) -> None:
        """The shipped increment schema (draft 7 + uuid) is promoted; its declared draft is still draft 7."""
        schema = compile_schema_file(INCREMENT, "schema")
        self.assertIs(schema.draft, DRAFT7)
        self.assertIsInstance(schema._validator, jsonschema_rs.Draft202012Validator)

    def test_other_schemas_keep_their_draft(self) -> None:
        """A $ref, array-form items, a format the draft defines itself, no borrowed format, draft 4: not promoted."""
        uuid_key = {"type": "string", "format": "uuid"}
        for schema in (
            {"$schema": DRAFT7.uri, "properties": {"k": uuid_key}, "$ref": "#/definitions/x", "definitions": {"x": {}}},
            {"$schema": DRAFT7.uri, "items": [uuid_key]},
            {"$schema": DRAFT7.uri, "properties": {"k": uuid_key, "e": {"format": "email"}}},
            {"$schema": DRAFT7.uri, "properties": {"k": {"type": "string"}}},
            {"$schema": DRAFT7.uri, "properties": {"k": uuid_key}, "if": {}, "then": {}},
            {"$schema": "http://json-schema.org/draft-04/schema#", "properties": {"k": uuid_key}},
        ):
            with self.subTest(schema=schema):
                compiled = compile_schema(schema)
                self.assertNotIsInstance(compiled._validator, jsonschema_rs.Draft202012Validator)
        self.assertIs(engine_for({"$schema": DRAFT6.uri, "format": "uuid"}, DRAFT6, borrowed_formats(DRAFT6)), DRAFT2020)

    def test_schema_errors_are_the_drafts_own(self) -> None:
        """A broken promotable schema fails as its draft says (the draft's class compiles first)."""
        with self.assertRaises(Exception) as caught:
            compile_schema({"$schema": DRAFT7.uri, "properties": {"k": {"format": "uuid", "minLength": -1}}})
        self.assertIn("minLength", str(caught.exception))


class SameAnswersTests(unittest.TestCase):
    """Promoted and own-draft validators agree: on the official draft 7 suite and on random values."""

    def test_official_draft7_suite_where_promotable(self) -> None:
        """Every draft 7 suite group whose keywords engine.py counts as shared gets the same answer from the 2020-12 class."""
        compared = 0
        for name in sorted(os.listdir(SUITE_DRAFT7)):
            if not name.endswith(".json"):
                continue
            with open(os.path.join(SUITE_DRAFT7, name), encoding="utf-8") as f:
                groups = json.load(f)
            for group in groups:
                schema = group["schema"]
                plain = without_schema_uri(schema) if isinstance(schema, dict) else schema
                if not _same(plain, BORROWED_7, set()):
                    continue
                own = own_draft_validator(schema)
                promoted = DRAFT2020.validator_cls(plain, validate_formats=True, ignore_unknown_formats=False)
                for case in group["tests"]:
                    with self.subTest(file=name, group=group["description"], test=case["description"]):
                        self.assertEqual(promoted.is_valid(case["data"]), own.is_valid(case["data"]))
                        self.assertEqual(promoted.is_valid(case["data"]), case["valid"])
                        compared += 1
        self.assertGreater(compared, 300)  # most of the suite's keyword files are shared keywords

    @settings(deadline=None, max_examples=200)
    @given(st.one_of(
        json_values(),
        st.fixed_dictionaries({"key": st.one_of(st.uuids().map(str), st.text(max_size=40)),
                               "value": st.one_of(st.integers(-3, 2**63), st.floats(allow_nan=False, allow_infinity=False))},
                              optional={"extra": json_values(max_leaves=3)}),
        st.uuids().map(lambda u: {"key": str(u).upper(), "value": 1}),
    ))
    def test_increment_schema_same_verdict_and_violation(self, value: Any) -> None:
        """For any value, the promoted increment schema answers and explains exactly as draft 7 does."""
        with open(INCREMENT, encoding="utf-8") as f:
            raw = json.load(f)
        promoted = compile_schema_file(INCREMENT, "schema")
        own = compile_schema(raw)
        own._validator = own_draft_validator(raw)  # relayd's compile before engine.py
        own.is_valid = own._validator.is_valid
        self.assertEqual(promoted.is_valid(value), own.is_valid(value))
        self.assertEqual(promoted.violation(value), own.violation(value))

    def test_uuid_edges(self) -> None:
        """UUID strings at the edges (case, braces, URN, missing hyphens, trailing newline) get draft 7's verdicts."""
        with open(INCREMENT, encoding="utf-8") as f:
            raw = json.load(f)
        promoted = compile_schema_file(INCREMENT, "schema")
        own = own_draft_validator(raw)
        key = str(uuid.UUID(int=12345))
        keys: List[str] = [key, key.upper(), "{%s}" % key, "urn:uuid:" + key, key.replace("-", ""), key + "\n", key[:-1] + "g", ""]
        for k in keys:
            with self.subTest(key=k):
                self.assertEqual(promoted.is_valid({"key": k, "value": 1}), own.is_valid({"key": k, "value": 1}))
