"""One reader loop per process: the change log, then only the streams that changed.

Its own connection (a blocking XREAD holds it), with a reply timeout of
the block plus a margin.  Each pass:

1. ``XREAD BLOCK 5000 STREAMS relayd:fanout:changes <cursor>``: the names
   of the streams written since the last pass (`relayd.fanout.changes`;
   every batch XADDed to a stream route appends its stream's name there).
   One key, whatever the number of watched streams.
2. ``XREAD COUNT 100 STREAMS <changed streams watched here> <positions>``:
   the new entries, handed to the hub, which fans them out.  A stream that
   returned a full COUNT stays "dirty" and is read again next pass.

Before this, one ``XREAD BLOCK`` named every watched stream: with 1,000
teams a read cost Redis ~1.6 ms and relayd the arguments and the reply of
1,000 keys, so at 2,000 POSTs/s the reader fell seconds behind
(docs/benchmarks.md).  Now a pass costs per *changed* stream.

Dirty streams come from the log, from a stream's first local subscriber
(`wake`), and from a *sweep* of every watched stream, which runs when the
loop (re)starts (after a reconnect the log may have been trimmed or Redis
replaced) and every `SWEEP_INTERVAL` as a safety net: the log is a hint,
the hub's positions are the truth, so a missed name delays entries, never
loses or repeats them.  While dirty streams wait, the log is polled without
blocking in the same pipeline as the data read.

Re-arming without waiting out the block: a stream that gets its first
local subscriber must be read now, not after up to `BLOCK_MS`.  The reader
sends ``CLIENT ID`` pipelined before the first blocking ``XREAD`` on each
connection (so it knows its connection's id, across reconnects), and
`wake` sends ``CLIENT UNBLOCK <id>`` on the main connection: the XREAD returns nil at once and
the next pass reads the new stream.  Should the unblock reach Redis before
the XREAD blocks (it replies 0), it is retried shortly.  A stream that
loses its last subscriber needs no re-arm: it is not read again, and
entries read for it meanwhile are dropped by the hub.

Redis restarts (nchan#442 delivered nothing after one): the connection
reconnects with backoff and the loop resumes from the hub's positions, the
ids of the last entries delivered, starting with a sweep.  A Redis that
came back empty (or from an older snapshot) generates new ids from its
clock, which are after those positions, so new entries are delivered;
entries lost with the old data are gone for everyone (docs/fanout.md).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger

from relayd.config import RedisConfig
from relayd.fanout.changes import CHANGES_KEY, changed_streams
from relayd.fanout.events import format_id, parse_id
from relayd.fanout.hub import Hub
from relayd.ops.metrics import Metrics
from relayd.redis.client import RedisClient

BLOCK_MS = 5000  # change-log XREAD block; bounds a stop's wait and the idle round trips (one per 5 s)
READ_COUNT = 100  # entries per stream per XREAD: bounds one reply (100 x 1 MiB bodies at worst), parsed within the reply timeout
CHANGES_COUNT = 2000  # change-log entries per XREAD (~60 B each)
STREAMS_PER_READ = 256  # streams named by one data XREAD (a sweep of 1,000 streams is four reads)
SWEEP_INTERVAL = 10.0  # seconds between reads of every watched stream (safety net for a missed change)
UNBLOCK_RETRY = 0.02  # seconds before retrying a CLIENT UNBLOCK that found nothing blocked
RESTART_DELAY = 1.0  # seconds before a loop that failed unexpectedly starts again (from a sweep)
#: Least time between two reads of the change log.  Under load each read
#: returns at once with the few names written since the last; waiting out
#: the rest of 5 ms batches them (at most 200 passes/s, at most 5 ms added,
#: and nothing added after an idle spell: the blocked XREAD was issued long
#: before).
MIN_READ_INTERVAL = 0.005
_ZERO_ID = b"0-0"


class StreamReader(Service):
    """Reads the streams that changed and delivers their entries to the hub."""

    _log = Logger()

    def __init__(
        self, reactor: Any, redis_config: RedisConfig, main: Any, hub: Hub, metrics: Metrics, client: Any = None
    ) -> None:
        """`main` is the process's main Redis client (for CLIENT UNBLOCK); `client`, the reader's
        own connection, is made from `redis_config` unless given (tests pass a double)."""
        self._reactor = reactor
        self._redis = (
            client
            if client is not None
            else RedisClient(reactor, attrs.evolve(redis_config, reply_timeout=BLOCK_MS / 1000 + 2.0))
        )
        self._main = main
        self._hub = hub
        self._metrics = metrics
        self._reading: Optional[Deferred[Any]] = None
        self._idle: Optional[Deferred[None]] = None  # fired by wake() when there was nothing to read
        self._client_id: Optional[bytes] = None
        self._blocked = False  # a blocking XREAD with a known client id is outstanding
        self._generation = 0  # blocking XREADs issued (tells a retry whether its XREAD is still the one out)
        #: Streams to read next pass (an ordered set: dict keys).
        self._dirty: Dict[bytes, None] = {}
        self._cursor = _ZERO_ID  # id of the last change-log entry read
        self._sweep_at = 0.0  # when the next full sweep is due
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

    def wake(self, stream: Optional[bytes] = None) -> None:
        """`stream` got its first local subscriber: read it now (the blocked XREAD returns)."""
        if stream is not None:
            self._dirty[stream] = None
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.callback(None)
            return
        if self._blocked:
            self._unblock(self._generation)

    def _unblock(self, generation: int) -> None:
        if not self._blocked or self._generation != generation or not self._main.ready:
            return  # that XREAD already returned
        if self._client_id is None:  # its CLIENT ID reply is still on the way
            self._reactor.callLater(UNBLOCK_RETRY, self._unblock, generation)
            return
        d = self._main.execute(b"CLIENT", b"UNBLOCK", self._client_id)
        d.addCallbacks(self._unblocked, lambda _: None, callbackArgs=(generation,))

    def _unblocked(self, reply: Any, generation: int) -> None:
        if reply == 0:
            # The XREAD was not blocking yet (the unblock overtook it): again shortly.
            self._reactor.callLater(UNBLOCK_RETRY, self._unblock, generation)

    def _kick(self) -> None:
        if self._reading is None and self.running:
            self._reading = self._read()
            self._reading.addErrback(self._crashed)

    def _crashed(self, failure: Any) -> None:
        """A bug stopped the loop: log it and start again shortly (a reader must not stay dead, nchan#442)."""
        self._log.failure("stream reader stopped unexpectedly; restarting in {delay} s", failure, delay=RESTART_DELAY)
        self._reactor.callLater(RESTART_DELAY, self._kick)

    def _sweep(self) -> None:
        """Mark every watched stream dirty (each is read once from its position)."""
        self._dirty.update(dict.fromkeys(self._hub.positions()))
        self._sweep_at = self._reactor.seconds() + SWEEP_INTERVAL

    @inlineCallbacks
    def _resync(self) -> Any:
        """Start the log at its end, then read every watched stream: nothing written before is missed."""
        last = yield self._redis.execute(b"XREVRANGE", CHANGES_KEY, b"+", b"-", b"COUNT", b"1")
        self._cursor = last[0][0] if last else _ZERO_ID
        self._sweep()

    def _take_dirty(self) -> List[bytes]:
        """Up to `STREAMS_PER_READ` dirty streams still watched here, oldest first."""
        dirty = self._dirty
        position = self._hub.position
        batch: List[bytes] = []
        while dirty and len(batch) < STREAMS_PER_READ:
            stream = next(iter(dirty))
            del dirty[stream]
            if position(stream) is not None:
                batch.append(stream)
        return batch

    def _changed(self, reply: Any) -> None:
        """A change-log XREAD reply: advance the cursor, mark the watched streams dirty."""
        if not reply:
            return
        entries = reply[0][1]
        if not entries:
            return
        self._cursor, names = changed_streams(entries)
        position = self._hub.position
        dirty = self._dirty
        for name in names:
            if position(name) is not None:
                dirty[name] = None

    @inlineCallbacks
    def _read(self) -> Any:
        """Change log, changed streams, deliver, repeat; until stopped or disconnected (on_ready restarts it)."""
        redis = self._redis
        clock = self._reactor
        hub = self._hub
        issued = -MIN_READ_INTERVAL
        resync = True
        pending: List[Deferred[Any]] = []  # this pass's replies (failures consumed on the way out)
        self._client_id = None  # a new connection: its id comes with the first blocking pass
        try:
            while self.running and redis.ready:
                if not hub.count:
                    self._dirty.clear()
                    self._idle = Deferred()
                    yield self._idle
                    resync = True  # the log moved on while nobody here watched: start at its end
                    continue
                try:
                    if resync:
                        yield self._resync()
                        resync = False
                    elif clock.seconds() >= self._sweep_at:
                        self._sweep()
                    wait = issued + MIN_READ_INTERVAL - clock.seconds()
                    if wait > 0:
                        yield deferLater(clock, wait, lambda: None)
                        if not (self.running and redis.ready):
                            break
                    issued = clock.seconds()
                    pending.clear()
                    streams = self._take_dirty()
                    if streams:
                        # Poll the log and read what is known dirty, pipelined.
                        changes_d = redis.execute(
                            b"XREAD", b"COUNT", b"%d" % CHANGES_COUNT, b"STREAMS", CHANGES_KEY, self._cursor
                        )
                        data_d = self._read_streams(streams)
                        pending += (changes_d, data_d)
                        self._changed((yield changes_d))
                        data = yield data_d
                    else:
                        self._generation += 1
                        self._blocked = True  # from now on, wake() unblocks it
                        id_d = redis.execute(b"CLIENT", b"ID") if self._client_id is None else None
                        changes_d = redis.execute(
                            b"XREAD", b"COUNT", b"%d" % CHANGES_COUNT, b"BLOCK", b"%d" % BLOCK_MS,
                            b"STREAMS", CHANGES_KEY, self._cursor,
                        )
                        pending += [d for d in (id_d, changes_d) if d is not None]
                        try:
                            if id_d is not None:
                                client_id = yield id_d
                                self._client_id = b"%d" % client_id if isinstance(client_id, int) else client_id
                            changes = yield changes_d
                        finally:
                            self._blocked = False
                        self._changed(changes)
                        streams = self._take_dirty()
                        if not streams:
                            self.lag = 0.0
                            continue
                        data_d = self._read_streams(streams)  # at once: the names just arrived
                        pending.append(data_d)
                        data = yield data_d
                except Exception:
                    # Connection lost or timed out: on_ready starts a new loop.  A
                    # reply behind the one that failed fails too and was never
                    # yielded: consume it, or it is an "Unhandled error in
                    # Deferred" at exit (a stop landing between two replies).
                    for d in pending:
                        d.addErrback(lambda _: None)
                    break
                self._deliver(data)
        finally:
            self._reading = None
            self._idle = None
            self._blocked = False

    def _read_streams(self, streams: List[bytes]) -> Deferred[Any]:
        """``XREAD COUNT .. STREAMS`` of `streams` from the hub's positions (no block)."""
        position = self._hub.position
        args: List[bytes] = [b"XREAD", b"COUNT", b"%d" % READ_COUNT, b"STREAMS"]
        args.extend(streams)
        for stream in streams:
            pos = position(stream)
            args.append(format_id(pos) if pos is not None else b"$")
        return self._redis.execute(*args)

    def _deliver(self, reply: Any) -> None:
        """Hand each stream's entries to the hub; a full COUNT means more to read."""
        if not reply:
            return
        newest = 0
        dirty = self._dirty
        for stream, entries in reply:
            if entries:
                newest = max(newest, parse_id(entries[-1][0])[0])
                self._hub.deliver(stream, entries)
                if len(entries) >= READ_COUNT:
                    dirty[stream] = None
        if newest:
            self.lag = max(0.0, self._reactor.seconds() - newest / 1000.0)
