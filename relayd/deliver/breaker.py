"""A circuit breaker per deliver: stop hammering an upstream that keeps failing.

States: ``closed`` (requests flow), ``open`` (no request starts until the
open period ends), ``half_open`` (one probe request; its success closes the
breaker, its failure opens it again for twice as long, up to a cap).  It
opens after `threshold` consecutive upstream failures (5xx, 408, timeouts,
connection errors); 4xx answers and 429s do not count: they say nothing
about the upstream's health (429 pauses the deliver through Retry-After).

Pure state machine on an injected clock; the service asks `allow()` before
each request and reports `success()` / `failure()` after.
"""

from __future__ import annotations

from typing import Any

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
#: Gauge values for metrics (relayd_deliver_circuit_state).
STATE_VALUES = {CLOSED: 0.0, HALF_OPEN: 1.0, OPEN: 2.0}


class CircuitBreaker:
    """Consecutive-failure breaker with exponentially growing open periods."""

    def __init__(self, clock: Any, threshold: int, base: float, cap: float) -> None:
        self._clock = clock
        self._threshold = threshold
        self._base = base
        self._cap = cap
        self._failures = 0
        self._opens = 0  # consecutive openings without a success: the open period doubles
        self._open_until = 0.0
        self._probing = False
        self._state = CLOSED

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (an open period that ended is half-open)."""
        if self._state == OPEN and self._clock.seconds() >= self._open_until:
            self._state = HALF_OPEN
            self._probing = False
        return self._state

    def wait(self) -> float:
        """Seconds until a request may start (0 when `allow()` would say yes)."""
        state = self.state
        if state == OPEN:
            return max(0.0, self._open_until - self._clock.seconds())
        if state == HALF_OPEN and self._probing:
            return self._base  # a probe is out: check again later (its result also wakes us)
        return 0.0

    def allow(self) -> bool:
        """May a request start now?  In half-open, only the one probe may."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        """An attempt succeeded (or failed for a reason that is not the upstream's health)."""
        self._failures = 0
        self._opens = 0
        self._probing = False
        self._state = CLOSED

    def failure(self) -> None:
        """An attempt failed because of the upstream; may open the breaker."""
        self._failures += 1
        state = self.state
        if state == HALF_OPEN or (state == CLOSED and self._failures >= self._threshold):
            self._opens += 1
            period = min(self._cap, self._base * 2.0 ** min(self._opens - 1, 60))
            self._open_until = self._clock.seconds() + period
            self._state = OPEN
            self._probing = False
