"""The counters of one process: a Redis connection, an aggregator per
``[[counter]]``, and a PostgreSQL flusher per counter that has a sink.

The counters get their own Redis connection so that a 1 MB apply script
never queues behind (or delays) the ingest path's LPUSHes, with a longer
reply timeout (`COUNTER_REPLY_TIMEOUT`).  Children stop
in reverse order: flushers, aggregators (each finishes its batch), then
the connection.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred

from relayd.config import CounterConfig, RedisConfig
from relayd.counters.aggregator import Aggregator, process_id
from relayd.counters.pg_flusher import PgFlusher
from relayd.redis.factory import make_redis_client

#: Reply timeout of the counters' connection, seconds: a 10k-message apply
#: takes ms, but tens of ms to seconds on a loaded Redis; a timeout is
#: harmless (the rerun is a no-op by batch id) but wasteful, and counters,
#: unlike acks, are not waiting clients.
COUNTER_REPLY_TIMEOUT = 10.0


class CounterService(MultiService):
    """All counters of this process (see the module docstring)."""

    def __init__(
        self,
        reactor: Any,
        counters: Sequence[CounterConfig],
        redis_config: RedisConfig,
        metrics: Any,
        worker_index: Optional[int] = None,
        pg_sink_factory: Any = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        timeout = max(redis_config.reply_timeout, COUNTER_REPLY_TIMEOUT)
        # A ClusterClient on a cluster: every script's keys share one slot (keys.py)
        self.redis = make_redis_client(reactor, attrs.evolve(redis_config, reply_timeout=timeout))
        self.redis.setServiceParent(self)
        self.aggregators: Dict[str, Aggregator] = {}
        self.flushers: Dict[str, PgFlusher] = {}
        proc = process_id(worker_index)
        flushers: List[PgFlusher] = []
        for c in counters:
            series = metrics.counter(c.name) if metrics is not None else None
            flusher: Optional[PgFlusher] = None
            agg = Aggregator(reactor, c, self.redis, proc, series)
            if c.postgres is not None:
                if pg_sink_factory is None:
                    from relayd.counters.pg_sink import PostgresSink

                    sink = PostgresSink(reactor, c.postgres, c.name, c.table)
                else:
                    sink = pg_sink_factory(c)
                flusher = PgFlusher(reactor, self.redis, agg.queue, sink, c.flush_interval, series)
                agg._on_pending = flusher.kick
                flushers.append(flusher)
                self.flushers[c.name] = flusher
            agg.setServiceParent(self)
            self.aggregators[c.name] = agg
            if series is not None:
                series.watch_staleness(agg, flusher, reactor)
        for f in flushers:
            f.setServiceParent(self)

    def stopService(self) -> Deferred:
        """Stop children one at a time, newest first (flushers, aggregators, Redis)."""
        self.running = 0
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for child in reversed(list(self)):
            await child.stopService()
