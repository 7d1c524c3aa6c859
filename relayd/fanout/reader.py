"""One ``XREAD BLOCK`` loop per process over the streams with local subscribers.

Its own connection (a blocking XREAD holds it), with a reply timeout of
the block plus a margin.  The loop reads from the hub's positions, hands
what it read to the hub, and goes again.

Re-arming without waiting out the block: a stream that gets its first
local subscriber must be read now, not after up to `BLOCK_MS`.  The reader
sends ``CLIENT ID`` pipelined before each ``XREAD`` (so it always knows its
connection's id, across reconnects), and `wake` sends ``CLIENT UNBLOCK
<id>`` on the main connection: the XREAD returns nil at once and the next
one includes the new stream.  Chosen over a short block (a wake-up costs
one command, not an idle round trip per second per process) and over a
private wake-up stream (no key to create, expire and clean up).  Should
the unblock reach Redis before the XREAD blocks (it replies 0), it is
retried shortly.  A stream that loses its last subscriber needs no
re-arm: the next XREAD leaves it out, and entries read for it meanwhile
are dropped by the hub.

Redis restarts (nchan#442 delivered nothing after one): the connection
reconnects with backoff and the loop resumes from the hub's positions, the
ids of the last entries delivered.  A Redis that came back empty (or from
an older snapshot) generates new ids from its clock, which are after those
positions, so new entries are delivered; entries lost with the old data
are gone for everyone (docs/fanout.md).
"""

from __future__ import annotations

from typing import Any, List, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger

from relayd.config import RedisConfig
from relayd.fanout.events import format_id, parse_id
from relayd.fanout.hub import Hub
from relayd.ops.metrics import Metrics
from relayd.redis.client import RedisClient

BLOCK_MS = 5000  # XREAD block; bounds a stop's wait and the idle round trips (one per 5 s)
READ_COUNT = 100  # entries per stream per XREAD: bounds one reply (100 x 1 MiB bodies at worst), parsed within the reply timeout
UNBLOCK_RETRY = 0.02  # seconds before retrying a CLIENT UNBLOCK that found nothing blocked
#: Least time between two XREADs.  An XREAD costs Redis (and us) work per
#: stream named, and under load each returns at once with the few entries
#: that arrived since the last: with 1,000 teams and 2,000 POSTs/s that was
#: ~2,000 XREADs of 1,000 keys a second and the reader fell behind by
#: seconds (bench/fanout_bench.py).  Waiting out the rest of 5 ms batches
#: them: at most 200 XREADs/s, at most 5 ms added, and nothing added after
#: an idle spell (the blocked XREAD was issued long before).
MIN_READ_INTERVAL = 0.005


class StreamReader(Service):
    """Reads the hub's streams and delivers entries to it."""

    _log = Logger()

    def __init__(self, reactor: Any, redis_config: RedisConfig, main: Any, hub: Hub, metrics: Metrics) -> None:
        """`main` is the process's main Redis client (for CLIENT UNBLOCK)."""
        self._reactor = reactor
        self._redis = RedisClient(reactor, attrs.evolve(redis_config, reply_timeout=BLOCK_MS / 1000 + 2.0))
        self._main = main
        self._hub = hub
        self._metrics = metrics
        self._reading: Optional[Deferred[Any]] = None
        self._idle: Optional[Deferred[None]] = None  # fired by wake() when there was nothing to read
        self._client_id: Optional[bytes] = None
        self._blocked = False  # an XREAD with a known client id is outstanding
        self._generation = 0  # XREADs issued (tells a retry whether its XREAD is still the one out)
        self.lag = 0.0
        hub.set_listener(self.wake)
        metrics.watch(metrics.fanout_reader_lag, lambda: self.lag)

    @property
    def ready(self) -> bool:
        """The reader's connection is up."""
        return self._redis.ready

    def startService(self) -> None:
        """Connect and start reading."""
        super().startService()
        self._redis.on_ready(self._kick)
        self._redis.startService()

    def stopService(self) -> Deferred[Any]:
        """Stop reading and close the connection."""
        super().stopService()
        self.wake()
        return self._redis.stopService()

    def wake(self) -> None:
        """The set of streams grew: make the outstanding XREAD return now."""
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.callback(None)
            return
        if self._blocked and self._client_id is not None:
            self._unblock(self._generation)

    def _unblock(self, generation: int) -> None:
        if not self._main.ready or self._client_id is None:
            return
        d = self._main.execute(b"CLIENT", b"UNBLOCK", self._client_id)
        d.addCallbacks(self._unblocked, lambda _: None, callbackArgs=(generation,))

    def _unblocked(self, reply: Any, generation: int) -> None:
        if reply == 0 and self._blocked and self._generation == generation:
            # The XREAD was not blocking yet (the unblock overtook it): again shortly.
            self._reactor.callLater(UNBLOCK_RETRY, self._unblock, generation)

    def _kick(self) -> None:
        if self._reading is None and self.running:
            self._reading = self._read()
            self._reading.addErrback(lambda f: self._log.failure("stream reader stopped unexpectedly", f))

    @inlineCallbacks
    def _read(self) -> Any:
        """XREAD, deliver, repeat; until stopped or disconnected (on_ready restarts it)."""
        redis = self._redis
        clock = self._reactor
        issued = -MIN_READ_INTERVAL
        try:
            while self.running and redis.ready:
                wait = issued + MIN_READ_INTERVAL - clock.seconds()
                if wait > 0:
                    yield deferLater(clock, wait, lambda: None)
                    if not (self.running and redis.ready):
                        break
                positions = self._hub.positions()
                if not positions:
                    self._idle = Deferred()
                    yield self._idle
                    continue
                keys = list(positions)
                args: List[bytes] = [b"XREAD", b"COUNT", b"%d" % READ_COUNT, b"BLOCK", b"%d" % BLOCK_MS, b"STREAMS"]
                args.extend(keys)
                args.extend(format_id(positions[k]) for k in keys)
                self._generation += 1
                issued = clock.seconds()
                pending: List[Deferred[Any]] = []
                try:
                    id_d = redis.execute(b"CLIENT", b"ID")
                    pending.append(id_d)
                    read_d = redis.execute(*args)
                    pending.append(read_d)
                    client_id = yield id_d
                    self._client_id = b"%d" % client_id if isinstance(client_id, int) else client_id
                    self._blocked = True
                    reply = yield read_d
                except Exception:
                    # Connection lost or timed out: on_ready starts a new loop.  When
                    # CLIENT ID failed first, the XREAD behind it fails too and was
                    # never yielded: consume it, or it is an "Unhandled error in
                    # Deferred" at exit (a stop that lands between the two replies).
                    for d in pending:
                        d.addErrback(lambda _: None)
                    break
                finally:
                    self._blocked = False
                if not reply:
                    self.lag = 0.0
                    continue
                newest = 0
                for stream, entries in reply:
                    if entries:
                        newest = max(newest, parse_id(entries[-1][0])[0])
                        self._hub.deliver(stream, entries)
                if newest:
                    self.lag = max(0.0, self._reactor.seconds() - newest / 1000.0)
        finally:
            self._reading = None
            self._idle = None
