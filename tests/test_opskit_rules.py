"""etc/prometheus/relayd.rules.yml: promtool accepts it, its unit tests pass, and it is complete.

test-case-name: tests.test_opskit_rules

* ``promtool check rules`` and ``promtool test rules`` over
  etc/prometheus/tests/*.test.yml (synthetic series -> expected alerts).
  promtool comes from Debian's ``prometheus`` package (scripts/test unpacks
  it when missing); without it these two tests skip, saying why.
* Every alert has a severity, a summary, a description and a runbook_url
  whose anchor is a section of docs/runbook.md, and a promtool test that
  makes it fire; every runbook alert section belongs to an alert.
* The status-class mapping of ``relayd:responses:rate5m`` puts every
  Problem of relayd/ingest/problems.py in the class of its HTTP status.
"""

from __future__ import annotations

import re
import subprocess
import unittest
from typing import Any, Dict, List, Set

import yaml

from relayd.ingest import problems
from tests.opskit_tools import (
    RULE_TESTS,
    RULES_PATH,
    alerts,
    github_anchor,
    load_rules,
    metric_names,
    promtool,
    recorded_names,
    runbook_anchors,
)

RUNBOOK_URL = re.compile(r"^https://relayd\.dev/docs/runbook\.md#([a-z0-9-]+)$")


class PromtoolTests(unittest.TestCase):
    """What Prometheus itself says about the rules."""

    def setUp(self) -> None:
        self.promtool = promtool()
        if self.promtool is None:
            self.skipTest("promtool not installed (Debian package prometheus; scripts/test installs it)")

    def run_promtool(self, *args: str) -> subprocess.CompletedProcess:
        """promtool with `args`, output captured."""
        assert self.promtool is not None
        return subprocess.run([self.promtool, *args], capture_output=True, text=True, timeout=120)

    def test_check_rules(self) -> None:
        """``promtool check rules`` accepts the file (syntax, PromQL, templates)."""
        result = self.run_promtool("check", "rules", RULES_PATH)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS", result.stdout)

    def test_rule_unit_tests(self) -> None:
        """``promtool test rules``: every test file's expected alerts and recorded values hold."""
        self.assertGreaterEqual(len(RULE_TESTS), 3)
        result = self.run_promtool("test", "rules", *RULE_TESTS)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(result.stdout.count("SUCCESS"), len(RULE_TESTS), result.stdout)

    def test_a_wrong_expectation_fails(self) -> None:
        """The rule tests can fail: a test expecting an alert that does not fire is reported."""
        import os
        import tempfile

        doc = {
            "rule_files": [RULES_PATH],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": [{"series": 'relayd_redis_up{job="relayd",instance="a"}', "values": "1x10"}],
                    "alert_rule_test": [
                        {
                            "alertname": "RelaydRedisDown",
                            "eval_time": "5m",
                            "exp_alerts": [{"exp_labels": {"severity": "critical", "instance": "a", "job": "relayd"}}],
                        }
                    ],
                }
            ],
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "wrong.test.yml")
            with open(path, "w") as f:
                yaml.safe_dump(doc, f)
            result = self.run_promtool("test", "rules", path)
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn("FAILED", result.stdout + result.stderr)


class CompletenessTests(unittest.TestCase):
    """Rules, their tests and the runbook belong together."""

    def test_every_alert_is_documented(self) -> None:
        """Each alert: severity, summary, description, and a runbook_url to its own runbook section."""
        anchors = runbook_anchors()
        self.assertTrue(alerts())
        for rule in alerts():
            name = rule["alert"]
            with self.subTest(alert=name):
                self.assertIn(rule.get("labels", {}).get("severity"), ("critical", "warning"))
                notes = rule.get("annotations", {})
                for key in ("summary", "description", "runbook_url"):
                    self.assertTrue(notes.get(key), f"{name}: no {key}")
                match = RUNBOOK_URL.match(notes["runbook_url"])
                self.assertIsNotNone(match, notes["runbook_url"])
                assert match is not None
                self.assertEqual(match.group(1), github_anchor(name), "anchor must be the alert's own section")
                self.assertIn(match.group(1), anchors, f"docs/runbook.md has no section '## {name}'")

    def test_runbook_has_no_orphan_alert_sections(self) -> None:
        """Every ``## Relayd...`` section of the runbook is an alert that exists (no stale pages)."""
        names = {github_anchor(r["alert"]) for r in alerts()}
        for anchor, heading in runbook_anchors().items():
            if heading.startswith("Relayd"):
                self.assertIn(anchor, names, f"runbook section {heading!r} has no alert")

    def test_every_alert_has_a_firing_unit_test(self) -> None:
        """Each alert appears in some promtool test with a non-empty ``exp_alerts`` (it is shown to fire)."""
        fired: Set[str] = set()
        for path in RULE_TESTS:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
            for test in doc["tests"]:
                for case in test.get("alert_rule_test", []):
                    if case.get("exp_alerts"):
                        fired.add(case["alertname"])
        missing = sorted({r["alert"] for r in alerts()} - fired)
        self.assertEqual(missing, [], "alerts without a promtool test that fires them")

    def test_recording_rules_read_only_defined_records(self) -> None:
        """A ``relayd:...`` name read by any rule is recorded by an earlier rule (no typo, no ordering trap)."""
        recorded: Set[str] = set()
        for rule in load_rules():
            for name in metric_names(rule["expr"]):
                if ":" in name:
                    self.assertIn(name, recorded, f"{rule.get('alert') or rule.get('record')} reads {name}")
            if "record" in rule:
                recorded.add(rule["record"])
        self.assertEqual(recorded, recorded_names())

    def test_groups_are_one_per_concern(self) -> None:
        """Group names are unique and ``relayd-<concern>``; recording rules all live in relayd-recording."""
        groups: List[str] = []
        for rule in load_rules():
            if not groups or groups[-1] != rule["group"]:
                groups.append(rule["group"])
            if "record" in rule:
                self.assertEqual(rule["group"], "relayd-recording")
        self.assertEqual(len(groups), len(set(groups)))
        for g in groups:
            self.assertRegex(g, r"^relayd-[a-z-]+$")


class StatusClassTests(unittest.TestCase):
    """The reason -> status class mapping of relayd:responses:rate5m matches the code."""

    def classes(self) -> Dict[str, str]:
        """``{code_class: expr}`` of the relayd:responses:rate5m rules."""
        return {
            r["labels"]["code_class"]: r["expr"] for r in load_rules() if r.get("record") == "relayd:responses:rate5m"
        }

    @staticmethod
    def reason_regex(expr: str) -> Any:
        """The ``reason`` matcher of an expression: (operator, compiled anchored regex)."""
        match = re.search(r'reason(=~|!~|=)"([^"]*)"', expr)
        assert match, expr
        op, value = match.groups()
        return op, re.compile(f"^(?:{value if op != '=' else re.escape(value)})$")

    def class_of(self, reason: str) -> List[str]:
        """Every code_class whose rejected-series matcher takes `reason`."""
        found = []
        for code_class, expr in self.classes().items():
            if "relayd_rejected_total" not in expr:
                continue
            op, regex = self.reason_regex(expr)
            hit = bool(regex.match(reason))
            if (op == "!~") != hit:
                found.append(code_class)
        return found

    def test_every_problem_lands_in_its_status_class(self) -> None:
        """Each Problem's reason is counted in exactly the class of its HTTP status."""
        found = [
            obj
            for obj in vars(problems).values()
            if isinstance(obj, type) and issubclass(obj, problems.Problem)
        ]
        self.assertGreater(len(found), 10)
        for problem in found:
            expected = "429" if problem.status == 429 else "5xx" if problem.status >= 500 else "4xx"
            with self.subTest(problem=problem.__name__, reason=problem.reason):
                self.assertEqual(self.class_of(problem.reason), [expected])

    def test_classes_are_complete(self) -> None:
        """The classes are 2xx (acked requests), 4xx, 429 and 5xx."""
        self.assertEqual(sorted(self.classes()), ["2xx", "429", "4xx", "5xx"])
        self.assertIn("relayd_request_duration_seconds_count", self.classes()["2xx"])
