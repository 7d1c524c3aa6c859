"""The gate every request passes before it starts: pause, circuit breaker, global rate.

Claimed messages queue here in claim order (FIFO), so first attempts start
in the order they were claimed.  The gate lets the head through when:

1. the deliver is not paused by a ``Retry-After`` (429/503): the pause is
   per deliver, so parallel requests stop together (vector#4724);
2. the circuit breaker allows a request (one probe when half-open);
3. a permit from the global rate limiter is at hand (fetched in batches).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from relayd.deliver.breaker import CircuitBreaker
from relayd.deliver.ratelimit import TOLERANCE, GlobalRateLimiter

#: Seconds to wait before asking Redis for permits again after an error.
REDIS_RETRY = 0.5


class Gate:
    """FIFO admission of requests under pause, breaker and rate."""

    _log = Logger()

    def __init__(self, reactor: Any, breaker: CircuitBreaker, limiter: GlobalRateLimiter) -> None:
        self._reactor = reactor
        self.breaker = breaker
        self._limiter = limiter
        self._waiters: Deque[Deferred] = deque()
        self._permits = 0
        self._permits_expire = 0.0
        self._paused_until = 0.0
        self._asking = False
        self._timer: Optional[Any] = None

    @property
    def waiting(self) -> int:
        """Requests waiting to start."""
        return len(self._waiters)

    @property
    def paused_for(self) -> float:
        """Seconds left of a Retry-After pause (0 when not paused)."""
        return max(0.0, self._paused_until - self._reactor.seconds())

    def pause(self, seconds: float) -> None:
        """No request starts for `seconds` (the longest pause asked for wins)."""
        self._paused_until = max(self._paused_until, self._reactor.seconds() + seconds)

    def enter(self) -> Deferred:
        """Fires when this request may start; cancel it to leave the queue."""

        def cancel(d: Deferred) -> None:
            try:
                self._waiters.remove(d)
            except ValueError:
                pass

        d: Deferred = Deferred(cancel)
        self._waiters.append(d)
        self.pump()
        return d

    def close(self) -> None:
        """Fail every waiter (at stop) and stop the timer."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiters, self._waiters = self._waiters, deque()
        for d in waiters:
            d.errback(CancelledError("deliver stopping"))

    def _later(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            return
        self._timer = self._reactor.callLater(max(seconds, 0.001), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.pump()

    def pump(self) -> None:
        """Let through whoever may start now; arrange to be called again otherwise."""
        while self._waiters:
            now = self._reactor.seconds()
            if self._paused_until > now:
                self._later(self._paused_until - now)
                return
            wait = self.breaker.wait()
            if wait > 0:
                self._later(wait)
                return
            if not self._limiter.unlimited:
                if now > self._permits_expire:
                    self._permits = 0  # unused grants are stale: using them would burst past the schedule
                if self._permits == 0:
                    self._ask()
                    return
            if not self.breaker.allow():
                self._later(self.breaker.wait() or 0.05)
                return
            if not self._limiter.unlimited:
                self._permits -= 1
            self._waiters.popleft().callback(None)

    def _ask(self) -> None:
        if self._asking:
            return
        self._asking = True

        def granted(result: Any) -> None:
            self._asking = False
            n, wait = result
            if n > 0:
                self._permits += n
                self._permits_expire = self._reactor.seconds() + TOLERANCE * 2
                self.pump()
            else:
                self._later(wait)

        def failed(failure: Any) -> None:
            self._asking = False
            self._log.debug("deliver: rate limiter unavailable: {error}", error=failure.value)
            self._later(REDIS_RETRY)

        self._limiter.take(len(self._waiters)).addCallbacks(granted, failed)
