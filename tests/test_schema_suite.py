"""The official JSON-Schema-Test-Suite, run through relayd's route validation.

test-case-name: tests.test_schema_suite

Each test group's schema is written to a file and compiled exactly as a
route's ``schema`` is at config load (`compile_schema_file`); each test's
instance is POSTed, as JSON bytes, through the route's `BodyParser`.  A
200-equivalent (values returned) means "valid"; a `SchemaViolation` means
"invalid".  Schemas of the draft 7 directory get ``"$schema": draft-07``
when they lack one, as a user writing draft 7 must (relayd's default is
2020-12).

What is left out, by name and with its reason (`LEFT_OUT`), and checked to
be exactly what disagrees, so the list can neither hide a regression nor
go stale:

- remote references (``http://localhost:1234/...``, the suite's "remotes"
  served over HTTP): relayd never fetches a schema over the network; these
  schemas are refused at config load in one line, which is asserted;
- 2020-12 ``format.json`` "only an annotation by default": relayd asserts
  ``format`` in every draft (docs/configuration.md);
- 2020-12 ``optional/format/unknown.json``: an unknown format is a config
  error in relayd, by design.

Vendored files: tests/data/json-schema-test-suite/ (README there).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import unittest
from typing import Any, Dict, Iterator, List, Optional, Tuple

from relayd.config import ConfigError
from relayd.ingest.problems import SchemaViolation
from relayd.ingest.validation import BodyParser
from relayd.schema import compile_schema_file

SUITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "json-schema-test-suite")
DRAFT7_URI = "http://json-schema.org/draft-07/schema#"
#: The agreement the issue asks for, over the cases that are run.
MIN_AGREEMENT = 0.99

REMOTE = "remote reference: relayd never fetches schemas over the network (refused in one line at config load)"
FORMAT_ASSERTED = "relayd asserts format in every draft; 2020-12 makes it an annotation by default"
UNKNOWN_FORMAT = "relayd refuses an unknown format at config load instead of letting it pass everything"

Case = Tuple[str, str, str]  # file, group description, test description

#: Groups outside refRemote.json whose schema needs a document of the suite's
#: remotes (http://localhost:1234/...), by (directory, file, group description).
REMOTE_GROUPS = {
    ("draft2020-12", "dynamicRef.json", "strict-tree schema, guards against misspelled properties"),
    ("draft2020-12", "dynamicRef.json", "tests for implementation dynamic anchor and reference link"),
    ("draft2020-12", "dynamicRef.json", "$ref and $dynamicAnchor are independent of order - $defs first"),
    ("draft2020-12", "dynamicRef.json", "$ref and $dynamicAnchor are independent of order - $ref first"),
    ("draft2020-12", "dynamicRef.json", "$ref to $dynamicRef finds detached $dynamicAnchor"),
    ("draft2020-12", "vocabulary.json", "schema that uses custom metaschema with with no validation vocabulary"),
    ("draft2020-12", "vocabulary.json", "ignore unrecognized optional vocabulary"),
}


def left_out(directory: str, file: str, group: Dict[str, Any], test: Dict[str, Any]) -> Optional[str]:
    """Why a case is not counted (None: it is run and must agree)."""
    if file == "refRemote.json" or (directory, file, group["description"]) in REMOTE_GROUPS:
        return REMOTE
    if directory == "draft2020-12" and file == "format.json" and test["description"].endswith(
        "is only an annotation by default"
    ):
        return FORMAT_ASSERTED
    if directory == "draft2020-12-format" and file == "unknown.json":
        return UNKNOWN_FORMAT
    return None


class Outcome:
    """What one directory of the suite gave: agreements, disagreements, and what was left out."""

    def __init__(self) -> None:
        self.agreed = 0
        self.disagreed: List[Tuple[Case, str]] = []
        self.left_out: List[Tuple[Case, str, bool]] = []  # case, reason, did relayd disagree?

    @property
    def run(self) -> int:
        """Cases counted."""
        return self.agreed + len(self.disagreed)

    @property
    def agreement(self) -> float:
        """Share of counted cases where relayd agrees with the suite."""
        return self.agreed / self.run


def groups(directory: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """``(file name, test group)`` for every group of a vendored directory."""
    path = os.path.join(SUITE, directory)
    for name in sorted(os.listdir(path)):
        if name.endswith(".json"):
            with open(os.path.join(path, name), encoding="utf-8") as f:
                for group in json.load(f):
                    yield name, group


def run_directory(test: unittest.TestCase, directory: str, default_schema: Optional[str] = None) -> Outcome:
    """Run every case of `directory` through compile_schema_file + BodyParser."""
    tmp = tempfile.mkdtemp(prefix="relayd-suite-")
    test.addCleanup(shutil.rmtree, tmp, True)
    path = os.path.join(tmp, "schema.json")
    outcome = Outcome()
    for file, group in groups(directory):
        schema = group["schema"]
        if default_schema and isinstance(schema, dict) and "$schema" not in schema:
            schema = {"$schema": default_schema, **schema}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(schema, f)
        parser: Optional[BodyParser] = None
        error = ""
        try:
            parser = BodyParser(compile_schema_file(path, "route[0].schema"))
        except ConfigError as e:
            error = str(e)
            test.assertNotIn("\n", error, f"{file} / {group['description']}: the config error is not one line")
        for case in group["tests"]:
            key = (file, group["description"], case["description"])
            if parser is None:
                got, why = None, f"schema refused: {error}"
            else:
                try:
                    parser.parse(json.dumps(case["data"]).encode("utf-8"), b"application/json")
                    got, why = True, "accepted"
                except SchemaViolation as e:
                    got, why = False, e.detail
            agrees = got == case["valid"]
            reason = left_out(directory, file, group, case)
            if reason is not None:
                outcome.left_out.append((key, reason, not agrees))
                if reason is REMOTE:
                    test.assertIsNone(parser, f"{key}: a remote $ref compiled")
                    test.assertTrue("never fetches" in error or "not a supported draft" in error, (key, error))
            elif agrees:
                outcome.agreed += 1
            else:
                outcome.disagreed.append((key, f"suite says valid={case['valid']}, relayd: {why}"))
    return outcome


class OfficialSuiteTests(unittest.TestCase):
    """The required tests of draft 7 and 2020-12 and the 2020-12 format tests agree >= 99 %."""

    maxDiff = None

    def check(self, directory: str, default_schema: Optional[str] = None) -> Outcome:
        """Run a directory; assert the agreement and that every left-out case is one that differs."""
        outcome = run_directory(self, directory, default_schema)
        summary = (
            f"{directory}: {outcome.agreed}/{outcome.run} agree ({100 * outcome.agreement:.2f} %), "
            f"{len(outcome.left_out)} left out"
        )
        print(summary)
        self.assertGreaterEqual(outcome.agreement, MIN_AGREEMENT, summary + "\n" + "\n".join(map(str, outcome.disagreed)))
        self.assertEqual(outcome.disagreed, [], "disagreements not named in LEFT_OUT rules")
        stale = [case for case, reason, differs in outcome.left_out if not differs and reason is not REMOTE]
        self.assertEqual(stale, [], "left out although relayd agrees: drop the rule")
        return outcome

    def test_draft7_required(self) -> None:
        """Draft 7, required tests: every case agrees except remote references."""
        outcome = self.check("draft7", DRAFT7_URI)
        self.assertEqual({reason for _, reason, _ in outcome.left_out}, {REMOTE})
        self.assertGreater(outcome.run, 850)

    def test_draft2020_12_required(self) -> None:
        """Draft 2020-12, required tests: every case agrees except remote refs and asserted formats."""
        outcome = self.check("draft2020-12")
        counts = {reason: sum(1 for _, r, _ in outcome.left_out if r is reason) for reason in (REMOTE, FORMAT_ASSERTED)}
        self.assertEqual(counts[FORMAT_ASSERTED], 19, "one 'annotation by default' case per 2020-12 format")
        self.assertGreater(outcome.run, 1150)

    def test_draft2020_12_formats(self) -> None:
        """Draft 2020-12 optional format tests (relayd asserts formats): all agree but 'unknown'."""
        outcome = self.check("draft2020-12-format")
        self.assertEqual({reason for _, reason, _ in outcome.left_out}, {UNKNOWN_FORMAT})
        self.assertGreater(outcome.run, 700)


if __name__ == "__main__":  # pragma: no cover
    unittest.main()
