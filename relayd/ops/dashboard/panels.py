"""Grafana panel JSON and grid layout: the boilerplate, in one place.

Every panel reads from the dashboard's ``$datasource`` variable (so the
dashboard imports into any Grafana with any Prometheus data source name),
and every query's selectors are written by the row functions with
``{instance=~"$instance"}`` (checked by tests/test_opskit_dashboard.py).

`Layout` packs panels left to right on Grafana's 24-column grid, starting a
new line when a panel does not fit, and a new row header per `Row`; it
hands out panel ids.  Row functions never think about coordinates.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import attrs

#: Grafana's grid is 24 columns wide.
GRID_WIDTH = 24
#: Panel height in grid units (30 px each): tall enough for a legend.
PANEL_HEIGHT = 8

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

Json = Dict[str, Any]


@attrs.frozen
class Query:
    """One PromQL query of a panel and its legend."""

    expr: str
    legend: str = ""
    heatmap: bool = False  # buckets for a heatmap panel (Grafana sorts them by `le`)


@attrs.frozen
class Panel:
    """What to draw: kind, title, queries, unit, size.  No ids or positions."""

    kind: str  # "timeseries" | "heatmap" | "stat"
    title: str
    queries: Sequence[Query]
    description: str = ""
    unit: str = "short"
    width: int = 8
    stack: bool = False
    max: Optional[float] = None


@attrs.frozen
class Row:
    """A titled row of panels."""

    title: str
    panels: Sequence[Panel]


def timeseries(title: str, *queries: Query, description: str = "", unit: str = "short", **kw: Any) -> Panel:
    """A time series panel (Grafana's default graph)."""
    return Panel("timeseries", title, queries, description, unit, **kw)


def heatmap(title: str, expr: str, description: str = "", unit: str = "s", width: int = 12) -> Panel:
    """A heatmap of a Prometheus histogram's bucket rates (`expr` sums ``by (le)``)."""
    return Panel("heatmap", title, (Query(expr, "{{le}}", heatmap=True),), description, unit, width)


def stat(title: str, *queries: Query, description: str = "", unit: str = "short", width: int = 4) -> Panel:
    """A single-value panel (the last value)."""
    return Panel("stat", title, queries, description, unit, width)


def _targets(queries: Sequence[Query]) -> List[Json]:
    targets = []
    for i, q in enumerate(queries):
        target: Json = {
            "datasource": DATASOURCE,
            "refId": chr(ord("A") + i),
            "expr": q.expr,
            "legendFormat": q.legend or "__auto",
            "range": True,
        }
        if q.heatmap:
            target["format"] = "heatmap"
        targets.append(target)
    return targets


def _field_config(panel: Panel) -> Json:
    defaults: Json = {"unit": panel.unit}
    if panel.max is not None:
        defaults["max"] = panel.max
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
    return {"defaults": defaults, "overrides": []}


def _options(panel: Panel) -> Json:
    if panel.kind == "heatmap":
        return {
            "calculate": False,
            "yAxis": {"unit": panel.unit, "axisPlacement": "left"},
            "rowsFrame": {"layout": "auto"},
            "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5},
            "cellGap": 1,
            "tooltip": {"mode": "single", "yHistogram": True},
            "legend": {"show": True},
        }
    if panel.kind == "stat":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        }
    return {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }


class Layout:
    """Hands out ids and grid positions, row by row."""

    def __init__(self) -> None:
        self._next_id = 1
        self._x = 0
        self._y = 0
        self._line_height = 0
        self.panels: List[Json] = []

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _newline(self) -> None:
        self._y += self._line_height
        self._x = 0
        self._line_height = 0

    def add_row(self, row: Row) -> None:
        """A row header, then its panels packed left to right."""
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "id": self._id(),
                "title": row.title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": self._y},
            }
        )
        self._y += 1
        for panel in row.panels:
            self._add(panel)

    def _add(self, panel: Panel) -> None:
        if self._x + panel.width > GRID_WIDTH:
            self._newline()
        self.panels.append(
            {
                "type": panel.kind,
                "id": self._id(),
                "title": panel.title,
                "description": panel.description,
                "datasource": DATASOURCE,
                "gridPos": {"h": PANEL_HEIGHT, "w": panel.width, "x": self._x, "y": self._y},
                "targets": _targets(panel.queries),
                "fieldConfig": _field_config(panel),
                "options": _options(panel),
            }
        )
        self._x += panel.width
        self._line_height = max(self._line_height, PANEL_HEIGHT)
