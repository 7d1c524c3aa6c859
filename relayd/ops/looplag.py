"""Reactor loop lag: how late the reactor runs a call it had scheduled.

Why: one reactor serves every request of a process, so any CPU-bound or
blocking code (a huge JSON body, a slow schema, a synchronous file call, a
GC pause) delays *everything* in that process, acks included.  Latency
histograms show the symptom per request; this shows the cause, per process,
even when no request is in flight.  The alert ``RelaydReactorLagHigh`` and
the dashboard's workers row read it.

How: a `LoopingCall` every `LAG_INTERVAL` seconds.  Each run compares the
time the call was due (the loop's start plus the intervals already run)
with the clock now, and observes the difference in
``relayd_reactor_lag_seconds``.  When the reactor was blocked across
several intervals, `LoopingCall` runs the call once (late) and skips the
missed ones: the lag observed is then the delay of the *first* missed run,
i.e. the whole stall, which is what an operator wants to see.

Cost: two clock reads and one histogram observation twice a second.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall

#: Seconds between measurements: a stall of more than half a second is
#: always seen, and the cost (two runs a second) is nothing next to ingest.
LAG_INTERVAL = 0.5


class LoopLagMonitor(Service):
    """Observes the reactor's lateness into a histogram while running."""

    def __init__(self, reactor: Any, histogram: Any, interval: float = LAG_INTERVAL) -> None:
        """`histogram` is anything with ``observe(seconds)`` (``Metrics.reactor_lag``)."""
        self._clock = reactor
        self._histogram = histogram
        self._interval = interval
        self._runs = 0  # intervals elapsed since the loop started, as LoopingCall counts them
        self._loop: Optional[LoopingCall] = None

    def _tick(self, count: int) -> None:
        assert self._loop is not None
        due = self._loop.starttime + (self._runs + 1) * self._interval  # type: ignore[operator]
        self._runs += count
        self._histogram.observe(max(0.0, self._clock.seconds() - due))

    def startService(self) -> None:
        """Start measuring (the first run is one interval from now)."""
        super().startService()
        self._runs = 0
        self._loop = LoopingCall.withCount(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def stopService(self) -> Deferred[None]:
        """Stop measuring (a Deferred: `RelayService` awaits every child's stop)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        super().stopService()
        return succeed(None)
