"""Drains this process's PostgreSQL pending list into the table.

Woken after every batch the aggregator completes (so PostgreSQL lags the
hash by one transaction), and on a timer for retries.  Each round reads
the oldest `CHUNK_BATCHES` summaries, applies them in one transaction
(pg_sink.py: exactly once by batch id) and then removes exactly those from
Redis (fenced by their digest).  PostgreSQL down: the round fails, the
summaries stay, the staleness gauge grows, the hash keeps counting (until
aggregator.MAX_PENDING summaries wait).
"""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relayd.counters.aggregate import batch_digest
from relayd.counters.cycle import CycleService
from relayd.counters.summary import Summary
from relayd.counters.work_queue import WorkQueue

#: Summaries per transaction: bounds one transaction's size while letting a
#: backlog after an outage drain in few round trips.
CHUNK_BATCHES = 50
#: Retry delays after a failure, seconds (doubling, capped).
RETRY_MIN = 0.5
RETRY_MAX = 5.0
#: Applied-batch ids are pruned this often, seconds.
PRUNE_EVERY = 3600.0


class PgFlusher(CycleService):
    """Moves summaries from Redis to PostgreSQL (see the module docstring)."""

    _log = Logger()

    def __init__(self, reactor: IReactorTime, redis: Any, queue: WorkQueue, sink: Any, interval: float, metrics: Any) -> None:
        self._reactor = reactor
        self._redis = redis
        self._queue = queue
        self._sink = sink
        self._interval = interval
        self._metrics = metrics
        CycleService.__init__(self)
        self._kicked = False
        self._failures = 0
        self._last_prune = 0.0
        #: ts of the oldest increment in a summary not yet committed (None: none known).
        self.oldest_ts: Optional[float] = None

    def kick(self) -> None:
        """A summary was queued: flush now rather than at the next tick."""
        self._kicked = True
        if self._failures == 0:
            self._wake()

    def stopService(self) -> Deferred[None]:
        """Stop after the round in progress; close the pool."""
        stopped = super().stopService()

        def close(result: Any) -> Any:
            self._sink.close()
            return result

        return stopped.addBoth(close)

    async def _run(self) -> None:
        while self.running:
            self._kicked = False
            try:
                if not self._redis.ready:
                    raise ConnectionError("redis not connected")
                full = await self.flush_once()
                if self._failures:
                    self._log.info("postgres sink: flushing again")
                self._failures = 0
                await self._maybe_prune()
            except Exception as e:
                self._failures += 1
                if self._failures == 1:
                    self._log.warn("postgres sink: flush failed ({error}); retrying", error=e)
                await self._pause(min(RETRY_MIN * 2 ** (self._failures - 1), RETRY_MAX))
                continue
            if full or self._kicked:
                continue
            await self._pause(self._interval)

    async def flush_once(self) -> bool:
        """One round; True when there may be more waiting."""
        raw: List[bytes] = await self._redis.execute(b"LRANGE", self._queue.keys.pending(), -CHUNK_BATCHES, -1)
        if not raw:
            self.oldest_ts = None
            return False
        summaries = []
        for entry in raw:
            try:
                summaries.append(Summary.decode(entry))
            except ValueError:
                self._log.error("postgres sink: dropping an undecodable summary {entry!r}", entry=entry[:200])
        tss = [s.ts for s in summaries if s.ts is not None]
        self.oldest_ts = min(tss) if tss else None
        new = await self._sink.apply(summaries)
        await self._queue.trim_pending(self._redis, len(raw), batch_digest(raw))
        if self._metrics is not None:
            self._metrics.pg_batches.inc(new)
        remaining = await self._redis.execute(b"LINDEX", self._queue.keys.pending(), -1)
        if remaining is None:
            self.oldest_ts = None
        else:
            try:
                self.oldest_ts = Summary.decode(remaining).ts
            except ValueError:
                pass
        return len(raw) >= CHUNK_BATCHES

    async def _maybe_prune(self) -> None:
        now = self._reactor.seconds()
        if now - self._last_prune >= PRUNE_EVERY:
            self._last_prune = now
            await self._sink.prune()
