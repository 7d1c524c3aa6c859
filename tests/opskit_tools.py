"""Helpers for the operations-kit tests: where the kit lives, promtool, PromQL names.

The kit (etc/prometheus/relayd.rules.yml, etc/prometheus/tests/,
etc/grafana/relayd.json, docs/runbook.md) is text that names metrics; these
helpers pull those names out so tests can hold them against what relayd
really exposes.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from typing import Any, Dict, Iterable, List, Optional, Set

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import REPO_ROOT

RULES_PATH = os.path.join(REPO_ROOT, "etc", "prometheus", "relayd.rules.yml")
RULE_TESTS = sorted(glob.glob(os.path.join(REPO_ROOT, "etc", "prometheus", "tests", "*.test.yml")))
DASHBOARD_PATH = os.path.join(REPO_ROOT, "etc", "grafana", "relayd.json")
RUNBOOK_PATH = os.path.join(REPO_ROOT, "docs", "runbook.md")

#: Series Prometheus makes itself (not in relayd's /metrics).
PROMETHEUS_SERIES = frozenset({"up"})

_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"inf", "nan", "Inf", "NaN", "atan2"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")


def promtool() -> Optional[str]:
    """The promtool binary: on PATH, or the copy scripts/test unpacked into .venv; else None."""
    found = shutil.which("promtool")
    if found:
        return found
    local = os.path.join(REPO_ROOT, ".venv", "promtool", "usr", "bin", "promtool")
    return local if os.access(local, os.X_OK) else None


def metric_names(expr: str) -> Set[str]:
    """Every metric (or recording rule) name a PromQL expression reads.

    Not a full PromQL parser, but enough for the kit: string literals,
    label matchers ``{...}``, ranges ``[...]`` and grouping clauses
    (``by (...)``, ``on (...)``, ...) are removed; what is left that is an
    identifier, not a keyword and not followed by ``(`` (a function) is a
    metric name.
    """
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        token = match.group(0)
        if token in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(token)
    return names


def load_rules() -> List[Dict[str, Any]]:
    """Every rule of relayd.rules.yml, each with its group's name under ``"group"``."""
    with open(RULES_PATH, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    return [dict(rule, group=group["name"]) for group in doc["groups"] for rule in group["rules"]]


def alerts() -> List[Dict[str, Any]]:
    """The alerting rules."""
    return [r for r in load_rules() if "alert" in r]


def recorded_names() -> Set[str]:
    """Names the recording rules define."""
    return {r["record"] for r in load_rules() if "record" in r}


def load_dashboard() -> Dict[str, Any]:
    """etc/grafana/relayd.json."""
    import json

    with open(DASHBOARD_PATH, encoding="utf-8") as f:
        return json.load(f)


def dashboard_exprs(dashboard: Dict[str, Any]) -> List[str]:
    """Every PromQL the dashboard runs: panel targets and variable queries."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            # label_values(metric{...}, label): the metric is the PromQL part.
            match = re.fullmatch(r"label_values\((.*),\s*\w+\s*\)", var["definition"])
            assert match, f"unexpected variable query {var['definition']!r}"
            exprs.append(match.group(1))
    return exprs


def kit_names() -> Dict[str, Set[str]]:
    """``{name: {where it is used}}`` for every name in the rules and the dashboard."""
    used: Dict[str, Set[str]] = {}
    for rule in load_rules():
        where = f"rule {rule.get('alert') or rule.get('record')}"
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(where)
    for expr in dashboard_exprs(load_dashboard()):
        for name in metric_names(expr):
            used.setdefault(name, set()).add("dashboard")
    return used


def exposed_names(exposition: str) -> Set[str]:
    """Every series name an exposition offers, including histogram/counter suffixes of empty families."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("", "_count", "_sum"),
        "gauge": ("",),
        "unknown": ("",),
        "info": ("_info",),
        "stateset": ("",),
    }
    names: Set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def missing_names(used: Dict[str, Set[str]], exposed: Iterable[str], recorded: Iterable[str]) -> List[str]:
    """Lines naming each used name that is neither exposed, recorded, nor Prometheus' own."""
    exposed, recorded = set(exposed), set(recorded)
    problems = []
    for name in sorted(used):
        if name in exposed or name in PROMETHEUS_SERIES:
            continue
        if ":" in name and name in recorded:
            continue
        problems.append(f"{name} (used by {', '.join(sorted(used[name]))})")
    return problems


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def runbook_anchors() -> Dict[str, str]:
    """``{anchor: heading}`` of every ``##`` heading in docs/runbook.md."""
    anchors = {}
    with open(RUNBOOK_PATH, encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                heading = line[3:].strip()
                anchors[github_anchor(heading)] = heading
    return anchors
