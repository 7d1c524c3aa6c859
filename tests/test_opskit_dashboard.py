"""etc/grafana/relayd.json: generated from relayd/ops/dashboard, and shaped as Grafana imports it.

test-case-name: tests.test_opskit_dashboard

Grafana is not in Debian, so the dashboard cannot be imported here; these
tests check the structure an import needs instead: a current
``schemaVersion``, the data source as a template variable that every panel
and target uses, ``instance`` and ``worker`` query variables, panels with
unique ids on a 24-column grid without overlaps, and targets with PromQL
that filters on the selected instance (and worker, for per-worker series).
"""

from __future__ import annotations

import re
import unittest
from typing import Any, Dict, List

from relayd.ops.dashboard import build
from relayd.ops.dashboard.panels import Layout, Query, Row, timeseries
from tests.opskit_tools import DASHBOARD_PATH, load_dashboard

#: schemaVersion written by Grafana 10.4 / 11.0; older releases cannot read newer models.
MIN_SCHEMA_VERSION = 39
PANEL_TYPES = {"timeseries", "heatmap", "stat"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SELECTOR = re.compile(r"\b(relayd[_:][\w:]*)(\{[^}]*\})?")


class GeneratedTests(unittest.TestCase):
    """The committed file is the generator's output."""

    def test_committed_file_is_up_to_date(self) -> None:
        """etc/grafana/relayd.json equals `build.render()` (edit rows.py, then regenerate)."""
        with open(DASHBOARD_PATH, encoding="utf-8") as f:
            committed = f.read()
        self.assertEqual(
            committed, build.render(), "stale: python -m relayd.ops.dashboard.build etc/grafana/relayd.json"
        )

    def test_check_mode_reports_a_stale_file(self) -> None:
        """``build --check`` exits 0 on the committed file and 1 on a changed one."""
        import os
        import tempfile

        self.assertEqual(build.main(["--check", DASHBOARD_PATH]), 0)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "relayd.json")
            with open(path, "w") as f:
                f.write(build.render().replace('"Ingest"', '"Ingress"'))
            self.assertEqual(build.main(["--check", path]), 1)

    def test_layout_packs_rows_without_overlap(self) -> None:
        """`Layout` wraps a panel that does not fit the 24 columns onto a new line below."""
        layout = Layout()
        layout.add_row(Row("r", [timeseries(f"p{i}", Query("x"), width=10) for i in range(3)]))
        pos = [p["gridPos"] for p in layout.panels]
        self.assertEqual([(g["x"], g["y"]) for g in pos], [(0, 0), (0, 1), (10, 1), (0, 9)])


class StructureTests(unittest.TestCase):
    """What Grafana needs to import the model."""

    def setUp(self) -> None:
        self.dash = load_dashboard()
        self.panels: List[Dict[str, Any]] = self.dash["panels"]
        self.variables = {v["name"]: v for v in self.dash["templating"]["list"]}

    def test_top_level(self) -> None:
        """uid, title, a current schemaVersion, time range, and no ``__inputs`` to fill in at import."""
        self.assertEqual(self.dash["uid"], "relayd")
        self.assertTrue(self.dash["title"])
        self.assertIsInstance(self.dash["schemaVersion"], int)
        self.assertGreaterEqual(self.dash["schemaVersion"], MIN_SCHEMA_VERSION)
        self.assertIn("from", self.dash["time"])
        self.assertNotIn("__inputs", self.dash)

    def test_datasource_is_a_variable(self) -> None:
        """A ``datasource`` variable of Prometheus type; every panel and target reads through it."""
        ds = self.variables["datasource"]
        self.assertEqual((ds["type"], ds["query"]), ("datasource", "prometheus"))
        for panel in self.panels:
            if panel["type"] == "row":
                continue
            with self.subTest(panel=panel["title"]):
                self.assertEqual(panel["datasource"], DATASOURCE)
                for target in panel["targets"]:
                    self.assertEqual(target["datasource"], DATASOURCE)

    def test_instance_and_worker_variables(self) -> None:
        """``instance`` and ``worker`` are multi-value query variables with "All" = ``.*``."""
        for name in ("instance", "worker"):
            var = self.variables[name]
            with self.subTest(variable=name):
                self.assertEqual(var["type"], "query")
                self.assertEqual(var["datasource"], DATASOURCE)
                self.assertTrue(var["definition"].startswith("label_values("))
                self.assertTrue(var["definition"].endswith(f", {name})"))
                self.assertEqual(var["query"]["query"], var["definition"])
                self.assertTrue(var["includeAll"] and var["multi"])
                self.assertEqual(var["allValue"], ".*")
        self.assertIn('instance=~"$instance"', self.variables["worker"]["definition"])

    def test_panels_have_ids_types_and_targets(self) -> None:
        """Unique integer ids and titles; known panel types; every panel has targets with expr and a unique refId."""
        ids = [p["id"] for p in self.panels]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertTrue(all(isinstance(i, int) and i > 0 for i in ids))
        titles = [p["title"] for p in self.panels if p["type"] != "row"]
        self.assertEqual(len(titles), len(set(titles)))
        for panel in self.panels:
            if panel["type"] == "row":
                self.assertEqual(panel["panels"], [])  # expanded rows keep their panels at top level
                self.assertFalse(panel["collapsed"])
                continue
            with self.subTest(panel=panel["title"]):
                self.assertIn(panel["type"], PANEL_TYPES)
                self.assertTrue(panel["targets"])
                ref_ids = [t["refId"] for t in panel["targets"]]
                self.assertEqual(len(ref_ids), len(set(ref_ids)))
                for target in panel["targets"]:
                    self.assertTrue(target["expr"].strip())
                    if panel["type"] == "heatmap":
                        self.assertEqual(target["format"], "heatmap")
                        self.assertIn("by (le)", target["expr"])
                self.assertIn("unit", panel["fieldConfig"]["defaults"])

    def test_grid(self) -> None:
        """Every panel fits the 24-column grid and no two overlap."""
        taken = set()
        for panel in self.panels:
            g = panel["gridPos"]
            with self.subTest(panel=panel["title"]):
                self.assertTrue(all(isinstance(g[k], int) for k in ("h", "w", "x", "y")))
                self.assertTrue(0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0)
                cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
                self.assertFalse(cells & taken, "overlaps another panel")
                taken |= cells

    def test_rows(self) -> None:
        """The rows the operator expects are there, in order."""
        rows = [p["title"] for p in self.panels if p["type"] == "row"]
        self.assertEqual(rows[:3], ["Ingest", "Latency", "Buffer and spool"])
        self.assertIn("Workers and reactor", rows)

    def test_queries_follow_the_variables(self) -> None:
        """Every relayd series selector filters on ``$instance``; per-worker series also on ``$worker``."""
        exprs = [t["expr"] for p in self.panels for t in p.get("targets", [])]
        uses_worker = False
        for expr in exprs:
            for match in SELECTOR.finditer(expr):
                name, matchers = match.group(1), match.group(2) or ""
                with self.subTest(expr=expr, metric=name):
                    self.assertIn('instance=~"$instance"', matchers)
                    if name.startswith("relayd_worker_"):
                        self.assertIn('worker=~"$worker"', matchers)
                        uses_worker = True
        self.assertTrue(uses_worker)

    def test_rate_windows_use_grafana_interval(self) -> None:
        """Panel rates use ``$__rate_interval`` (never shorter than four scrapes) or a recording rule."""
        for panel in self.panels:
            for target in panel.get("targets", []):
                for window in re.findall(r"\[([^\]]+)\]", target["expr"]):
                    self.assertEqual(window, "$__rate_interval", target["expr"])
