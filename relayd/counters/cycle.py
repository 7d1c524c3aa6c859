"""A service that runs one coroutine loop of cycles with cancellable pauses.

The aggregator and the PostgreSQL flusher both work in cycles: do a round,
pause, repeat; a stop cancels the pause and waits for the round in progress
(a batch is never left half done).  This is that loop's lifecycle, once.
"""

from __future__ import annotations

from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater


class CycleService(Service):
    """Runs `_run()` from start to stop; `_pause(s)` is a sleep that a stop (or `_wake`) cuts short."""

    _reactor: IReactorTime

    def __init__(self) -> None:
        self._sleep: Optional[Deferred[None]] = None
        self._loop: Optional[Deferred[None]] = None

    async def _run(self) -> None:
        raise NotImplementedError

    def startService(self) -> None:
        """Start the loop."""
        super().startService()
        self._loop = Deferred.fromCoroutine(self._run())

    def stopService(self) -> Deferred[None]:
        """Stop after the cycle in progress."""
        super().stopService()
        self._wake()
        loop, self._loop = self._loop, None
        return loop if loop is not None else succeed(None)

    def _wake(self) -> None:
        """End the current pause now."""
        if self._sleep is not None:
            self._sleep.cancel()

    async def _pause(self, seconds: float) -> None:
        if not self.running:
            return
        self._sleep = deferLater(self._reactor, max(0.0, seconds), lambda: None)
        try:
            await self._sleep
        except CancelledError:
            pass
        finally:
            self._sleep = None
