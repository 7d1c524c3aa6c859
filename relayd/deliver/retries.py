"""The retry set: failed messages wait in a sorted set scored by due time.

A message that failed with a retryable outcome moves (atomically, with its
retry state in front: relayd/deliver/message.py) from the processing list to
``{list}:retry:<name>``; the mover of every process returns due ones to the
consuming end of the list, so they are claimed next.  Waiting happens in
Redis, not in a process: a retry survives a restart, and a message waiting
for its retry never blocks the others (redpanda-data/connect#414).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relayd.deliver.keys import DeliverKeys
from relayd.deliver.scripts import MOVE_DUE

#: Seconds between mover runs: retries are due with at most this much delay.
MOVE_INTERVAL = 0.25
#: Items one script run moves (a long script blocks Redis for everyone).
MOVE_BATCH = 100


class RetryMover:
    """Periodically moves due retries back to the list."""

    _log = Logger()

    def __init__(self, reactor: Any, redis: Any, keys: DeliverKeys) -> None:
        self._reactor = reactor
        self._redis = redis
        self._keys = keys
        self._busy = False
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor

    def start(self) -> None:
        """Start moving."""
        self._loop.start(MOVE_INTERVAL, now=True)

    def stop(self) -> None:
        """Stop moving (due items wait for the next process that runs a mover)."""
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        if not self._busy and self._redis.ready:
            self._busy = True
            ensureDeferred(self._move()).addBoth(lambda _: setattr(self, "_busy", False))

    async def _move(self) -> None:
        try:
            while True:
                moved = await MOVE_DUE.run(
                    self._redis, [self._keys.retry, self._keys.list], [b"%.3f" % self._reactor.seconds(), MOVE_BATCH]
                )
                if int(moved) < MOVE_BATCH:
                    return
        except Exception as e:  # Redis down: the next tick tries again
            self._log.debug("deliver: retry mover failed: {error}", error=e)
