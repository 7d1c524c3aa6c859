"""Assemble the dashboard and write etc/grafana/relayd.json.

Usage::

    python -m relayd.ops.dashboard.build etc/grafana/relayd.json   # write
    python -m relayd.ops.dashboard.build --check etc/grafana/relayd.json  # exit 1 if stale

What makes it import into a current Grafana (10.4 and later, 11.x, 12.x):
``schemaVersion`` `SCHEMA_VERSION`, a ``datasource`` template variable of
type ``prometheus`` that every panel and target reads (no hard-wired data
source uid, no ``__inputs`` to fill in), and ``instance`` / ``worker`` query
variables that read label values through that data source.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Optional, Sequence

from relayd.ops.dashboard.panels import DATASOURCE, Layout
from relayd.ops.dashboard.rows import ROWS

#: Grafana 10.4 / 11.0 write schemaVersion 39; later releases migrate it on import.
SCHEMA_VERSION = 39
UID = "relayd"
TITLE = "relayd"


def _query_variable(name: str, label: str, query: str, multi: bool) -> Dict[str, Any]:
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,  # on time range change: instances come and go
        "includeAll": True,
        "allValue": ".*",
        "multi": multi,
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
    }


def templating() -> List[Dict[str, Any]]:
    """The datasource, instance and worker variables."""
    return [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Data source",
            "query": "prometheus",
            "refresh": 1,
            "current": {},
            "options": [],
            "hide": 0,
        },
        _query_variable("instance", "Instance", "label_values(relayd_redis_up, instance)", multi=True),
        # Only a supervisor (workers > 1) has per-worker series; "All" (.*)
        # keeps every panel working for a single process too.
        _query_variable(
            "worker", "Worker", 'label_values(relayd_worker_up{instance=~"$instance"}, worker)', multi=True
        ),
    ]


def dashboard() -> Dict[str, Any]:
    """The whole dashboard model, as Grafana's "Export > JSON" would write it."""
    layout = Layout()
    for row in ROWS:
        layout.add_row(row())
    return {
        "uid": UID,
        "title": TITLE,
        "description": "relayd: ingest, latency, buffer and spool, Redis, workers. Source: relayd/ops/dashboard/.",
        "tags": ["relayd", "redis"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,  # shared crosshair
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [],
        "templating": {"list": templating()},
        "panels": layout.panels,
    }


def render() -> str:
    """The dashboard as the committed file's text (stable key order, 2-space indent)."""
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write (or with ``--check`` compare) the dashboard file."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    if len(paths) != 1:
        sys.stderr.write("usage: python -m relayd.ops.dashboard.build [--check] PATH\n")
        return 2
    text = render()
    if check:
        try:
            with open(paths[0], encoding="utf-8") as f:
                current = f.read()
        except OSError as e:
            sys.stderr.write(f"{paths[0]}: {e}\n")
            return 1
        if current != text:
            sys.stderr.write(f"{paths[0]} is stale: run python -m relayd.ops.dashboard.build {paths[0]}\n")
            return 1
        return 0
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
