"""The cyclic garbage collector: kept off the long-lived heap, and measured.

A stored-ack request creates a few short-lived reference cycles (Deferred
callbacks that refer back to their request, Failures with tracebacks).  With
CPython's default thresholds a generation-2 collection walks every object
the process holds (config, routes, compiled schemas, Twisted's and Klein's
modules: ~10^5-10^6 objects) and stalls the reactor for tens of
milliseconds; with ``gc.disable()`` the same load showed p99 3.4 ms instead
of 17.5 ms (issue 13).  Disabling the collector would leak those cycles, so
instead:

- `GcService` calls ``gc.freeze()`` once the reactor runs: everything built
  at start-up moves to the permanent generation and is never walked again;
- the generation-0 threshold rises from 700 to `GEN0_THRESHOLD`, so young
  collections run ~70x less often (each still walks only young objects);
- every collection is timed through ``gc.callbacks`` into
  ``relayd_gc_pause_seconds{generation}``, so a stall shows on a dashboard
  instead of being guessed at.

The collector is process-wide state; this service is the one place that
touches it, and it restores the callback list when stopped.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Dict, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed

from relayd.ops.metrics import Metrics

#: Young-generation threshold: allocations minus deallocations between
#: collections.  50,000 young objects are a few MiB at most; measured in
#: docs/benchmarks.md.
GEN0_THRESHOLD = 50_000


class GcService(Service):
    """Freeze the start-up heap, raise the young threshold, time every collection."""

    def __init__(
        self,
        reactor: Any,
        metrics: Metrics,
        gen0_threshold: int = GEN0_THRESHOLD,
        timer: Callable[[], float] = time.perf_counter,
        freeze_on_start: bool = True,
    ) -> None:
        """`freeze_on_start` False leaves the heap alone (unit tests share their process)."""
        self._reactor = reactor
        self._freeze_on_start = freeze_on_start
        self._metrics = metrics
        self._gen0 = gen0_threshold
        self._timer = timer
        self._started: Optional[float] = None
        self._saved: Optional[Tuple[int, int, int]] = None
        self._observe: Dict[int, Any] = {g: metrics.gc_pause.labels(generation=str(g)) for g in (0, 1, 2)}

    def startService(self) -> None:
        """Install the timing callback; freeze once the reactor has started."""
        super().startService()
        gc.callbacks.append(self._on_gc)
        self._saved = gc.get_threshold()
        _, gen1, gen2 = self._saved
        gc.set_threshold(self._gen0, gen1, gen2)
        if self._freeze_on_start:
            self._reactor.callWhenRunning(self.freeze)

    def stopService(self) -> Deferred:
        """Remove the callback and restore the thresholds."""
        super().stopService()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._saved is not None:
            gc.set_threshold(*self._saved)
        return succeed(None)

    def freeze(self) -> None:
        """Collect once, then move every surviving object to the permanent generation."""
        gc.collect()
        gc.freeze()

    def _on_gc(self, phase: str, info: Dict[str, int]) -> None:
        if phase == "start":
            self._started = self._timer()
        elif self._started is not None:
            observe = self._observe.get(info.get("generation", 2))
            if observe is not None:
                observe.observe(self._timer() - self._started)
            self._started = None
