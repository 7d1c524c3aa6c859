"""Hot-path series as plain numbers, exported at scrape time.

prometheus-client's `Counter.inc` and `Histogram.observe` take a lock on
every call (they are thread-safe; relayd's hot path runs on one reactor
thread).  A stored-ack request paid ~1.5-2 us for its two updates.  Here a
counter is one float addition and a histogram one ``bisect`` plus two
additions; `FastCollector` turns them into the same families (names, types,
labels and ``le`` buckets) when ``/metrics`` is scraped, which also happens
on the reactor thread, so nothing races.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class FastCounter:
    """A monotonically growing number, updated without a lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` (>= 0)."""
        self.value += amount


class FastHistogram:
    """Observation counts per bucket (non-cumulative) and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Record one observation (le is inclusive, as Prometheus defines it)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> List[Tuple[str, float]]:
        """``[(le, count)]`` as an exposition wants them, +Inf last."""
        out: List[Tuple[str, float]] = []
        total = 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            out.append((floatToGoString(bound), float(total)))
        return out


class FastCollector:
    """Exports labelled families of fast series; the children are read at scrape time."""

    def __init__(self) -> None:
        self._counters: List[Tuple[str, str, str, Callable[[], Iterable[Tuple[str, FastCounter]]]]] = []
        self._histograms: List[Tuple[str, str, Tuple[str, ...], Callable[[], Iterable[Tuple[Tuple[str, ...], FastHistogram]]]]] = []

    def counter(self, name: str, doc: str, label: str, children: Callable[[], Iterable[Tuple[str, FastCounter]]]) -> None:
        """Export ``name_total{label=...}`` from `children()`: ``[(label value, counter)]``."""
        self._counters.append((name, doc, label, children))

    def histogram(
        self,
        name: str,
        doc: str,
        labels: Tuple[str, ...],
        children: Callable[[], Iterable[Tuple[Tuple[str, ...], FastHistogram]]],
    ) -> None:
        """Export a histogram family from `children()`: ``[(label values, histogram)]``."""
        self._histograms.append((name, doc, labels, children))

    def collect(self) -> Iterator[Metric]:
        """The families, as of now."""
        for name, doc, label, children in self._counters:
            family = CounterMetricFamily(name, doc, labels=[label])
            for value, counter in children():
                family.add_metric([value], counter.value)
            yield family
        for name, doc, labels, hchildren in self._histograms:
            hfamily = HistogramMetricFamily(name, doc, labels=list(labels))
            for values, histogram in hchildren():
                hfamily.add_metric(list(values), histogram.cumulative(), histogram.sum)
            yield hfamily


def single(histogram: FastHistogram) -> Callable[[], Iterable[Tuple[Tuple[str, ...], FastHistogram]]]:
    """Children of an unlabelled histogram."""
    return lambda: [((), histogram)]


def items(children: Dict[str, FastCounter]) -> Callable[[], Iterable[Tuple[str, FastCounter]]]:
    """Children of a counter family kept in a dict (read live at each scrape)."""
    return lambda: list(children.items())
