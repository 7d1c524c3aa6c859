"""Merge the Prometheus expositions of several worker processes into one.

Why not prometheus-client's multiprocess mode: it needs a module-global
registry and an environment variable set before the first import (relayd
gives every daemon its own registry so tests can build many), it does not
support callback gauges (relayd reads buffer and spool depth at scrape time
with `Gauge.set_function`, so the hot path never touches a gauge), and it
needs mmap files per pid plus ``mark_process_dead`` bookkeeping.  Scraping
each worker's own admin endpoint (a private unix socket) at scrape time and
summing keeps every worker's metrics code unchanged, costs nothing between
scrapes, and the merge rule for each gauge is explicit in `GAUGE_RULES`.

Rules: counters and histograms are summed (buckets, ``_count`` and
``_sum`` are all additive); gauges are summed unless `GAUGE_RULES` says
``max`` or ``min``.  ``_created`` samples are dropped (a sum of creation
times means nothing).  Counters of a worker that exited are kept in a
*retired* total (`MetricsMerger.retire`) so an aggregate counter does not
go backwards when a worker is restarted or replaced by a reload.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

from prometheus_client.parser import text_string_to_metric_families

#: Gauges that are not summed over workers.
GAUGE_RULES: Dict[str, str] = {
    "relayd_redis_up": "min",  # the daemon has Redis only if every worker has
    "relayd_spill_mode": "max",  # any worker spilling is worth seeing
    "relayd_spill_targets": "max",  # workers spool the same destinations (one failed node)
    "relayd_spool_oldest_age_seconds": "max",
    "relayd_counter_staleness_seconds": "max",  # the oldest unapplied increment of any worker
    "relayd_deliver_queue_lag_seconds": "max",  # every worker reads the same list
    "relayd_deliver_circuit_state": "max",  # the most open breaker of any worker
    "relayd_fanout_reader_lag_seconds": "max",  # the laggiest worker's subscribers see it
    "relayd_ready": "min",  # ready only if every worker is
    "relayd_route_info": "max",  # every worker has the same routes: 1, not N
}

SampleKey = Tuple[str, Tuple[Tuple[str, str], ...]]


class Family:
    """One metric family being merged: type, help, and samples by (name, labels)."""

    def __init__(self, name: str, kind: str, documentation: str) -> None:
        self.name = name
        self.kind = kind
        self.documentation = documentation
        self.samples: Dict[SampleKey, float] = {}

    def add(self, sample_name: str, labels: Dict[str, str], value: float) -> None:
        """Fold one sample in, by this family's rule."""
        key = (sample_name, tuple(sorted(labels.items())))
        old = self.samples.get(key)
        if old is None:
            self.samples[key] = value
            return
        rule = GAUGE_RULES.get(self.name, "sum") if self.kind == "gauge" else "sum"
        if rule == "max":
            self.samples[key] = max(old, value)
        elif rule == "min":
            self.samples[key] = min(old, value)
        else:
            self.samples[key] = old + value


def parse(text: str) -> List[Tuple[str, str, str, List[Tuple[str, Dict[str, str], float]]]]:
    """``[(family, type, help, [(sample, labels, value)])]`` of an exposition, without ``_created``."""
    out = []
    for fam in text_string_to_metric_families(text):
        if fam.name.endswith("_created"):
            continue
        samples = [(s.name, dict(s.labels), float(s.value)) for s in fam.samples if not s.name.endswith("_created")]
        out.append((fam.name, fam.type, fam.documentation, samples))
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return repr(float(value))
    return repr(value)


def render(families: Iterable[Family]) -> bytes:
    """Prometheus text format (0.0.4) of merged families."""
    lines: List[str] = []
    for fam in families:
        # Text format 0.0.4: a counter's HELP/TYPE name is its sample name (``_total``).
        name = fam.name + "_total" if fam.kind == "counter" and not fam.name.endswith("_total") else fam.name
        lines.append(f"# HELP {name} {fam.documentation.replace(chr(10), ' ')}")
        lines.append(f"# TYPE {name} {fam.kind}")
        for (sample_name, labels), value in fam.samples.items():
            if labels:
                label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{sample_name}{{{label_text}}} {_format_value(value)}")
            else:
                lines.append(f"{sample_name} {_format_value(value)}")
    return ("\n".join(lines) + "\n").encode("utf-8")


class MetricsMerger:
    """Sums worker expositions; remembers counters of workers that are gone."""

    def __init__(self) -> None:
        self._retired: Dict[str, Family] = {}

    def retire(self, text: Optional[str]) -> None:
        """Keep the counters/histograms of a worker's last scrape (it exited)."""
        if not text:
            return
        for name, kind, doc, samples in parse(text):
            if kind == "gauge":
                continue
            fam = self._retired.setdefault(name, Family(name, kind, doc))
            for sample_name, labels, value in samples:
                fam.add(sample_name, labels, value)

    def merge(self, texts: Iterable[str], extra: Iterable[Family] = ()) -> bytes:
        """One exposition: the live workers' `texts`, retired counters, then `extra` families."""
        families: Dict[str, Family] = {}
        for text in texts:
            for name, kind, doc, samples in parse(text):
                fam = families.setdefault(name, Family(name, kind, doc))
                for sample_name, labels, value in samples:
                    fam.add(sample_name, labels, value)
        for name, retired in self._retired.items():
            fam = families.setdefault(name, Family(name, retired.kind, retired.documentation))
            for (sample_name, label_pairs), value in retired.samples.items():
                fam.add(sample_name, dict(label_pairs), value)
        for fam in extra:
            families[fam.name] = fam
        return render(families.values())
