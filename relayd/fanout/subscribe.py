"""``GET <stream route>`` with ``Accept: text/event-stream``: start, resume, go live.

`Subscriptions` is what ingest hands a subscription to (after route lookup
and the route's auth).  Per subscriber:

1. Its start: ``Last-Event-ID`` (header, or ``?last_event_id=``), else the
   stream's newest entry id (``XREVRANGE key + - COUNT 1``; ``0-0`` for a
   stream that does not exist yet), so it receives every entry stored
   after it subscribed.  A malformed id, or one after the stream's newest
   entry *and* ahead of this host's clock by more than `FUTURE_SKEW`, is a
   400 problem (an id from an older incarnation of an empty-restarted Redis
   is in the past: the subscriber simply continues with new entries).
2. The response starts (``200``, ``text/event-stream``) with a ``retry:``
   of `RETRY_BASE_MS` plus up to `RETRY_JITTER_MS` at random, so a restart
   does not make every browser reconnect in the same instant
   (dunglas/mercure#1212).
3. It joins the hub.  Resuming, it replays ``XRANGE key (<id> + COUNT
   REPLAY_PAGE`` page by page while live events are held off; once a short
   page reaches the reader's position for the stream it goes live in the
   same reactor turn.  Live events at or before its cursor are skipped, so
   the seam has no gap and no duplicate.  An id older than the history
   replays from the oldest entry still held.

Heartbeats (``: ping``) keep every subscriber from being silent for more
than `HEARTBEAT_INTERVAL`: one timer, not one per connection, visits a
150th of the subscribers every 50 ms (no burst of 10,000 writes in one
reactor turn), so each every 7.5 s, and pings it unless it was written to
since the last visit (subscribers that get events get no pings).
"""

from __future__ import annotations

import random
from typing import Any, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relayd.config import RedisConfig
from relayd.fanout.events import HEARTBEAT, ZERO, StreamId, format_id, parse_id, retry_field
from relayd.fanout.hub import Hub
from relayd.fanout.reader import StreamReader
from relayd.fanout.sse import Subscriber
from relayd.ingest.problems import BadRequest, NotReady, Problem
from relayd.ops.metrics import Metrics

HEARTBEAT_INTERVAL = 15.0  # seconds a subscriber may stay silent; under common proxy idle timeouts (nginx 60 s, ALB 60 s)
#: Each subscriber is visited every half interval and pinged unless it was
#: written to since the last visit: none is silent for more than 15 s, and
#: subscribers that get events get no pings at all.
HEARTBEAT_VISIT = HEARTBEAT_INTERVAL / 2
HEARTBEAT_SLICES = 150  # one slice of the subscribers per 50 ms (~70 of 10,000): no burst of writes
RETRY_BASE_MS = 2000  # browsers reconnect after 2..5 s: quick, yet spread over 3 s
RETRY_JITTER_MS = 3000
REPLAY_PAGE = 500  # entries per XRANGE while resuming
FUTURE_SKEW = 60.0  # seconds an id may be ahead of this host's clock (clock skew between hosts)
#: Bytes an event queue may hold while the transport is full, beyond
#: Twisted's 64 KiB transport buffer: one event of the largest default body
#: (1 MiB) or ~4,000 position updates of ~250 B; past it the subscriber is
#: cut.  The queue holds references to the bytes shared by all subscribers,
#: so many slow subscribers of one stream cost little more than one.
QUEUE_LIMIT = 1024 * 1024


class Subscriptions(MultiService):
    """The fan-out side of one process: hub, reader, heartbeats, subscriptions."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        redis_config: RedisConfig,
        redis: Any,
        metrics: Metrics,
        rng: Optional[random.Random] = None,
        queue_limit: int = QUEUE_LIMIT,
    ) -> None:
        """`redis` is the main client (XRANGE, XREVRANGE, CLIENT UNBLOCK)."""
        super().__init__()
        self._reactor = reactor
        self._redis = redis
        self._metrics = metrics
        self._rng = rng if rng is not None else random.Random()
        self._queue_limit = queue_limit
        self.hub = Hub(reactor, metrics, HEARTBEAT_SLICES)
        self.reader = StreamReader(reactor, redis_config, redis, self.hub, metrics)
        self.reader.setServiceParent(self)
        self._tick = 0
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = reactor
        self._cut = metrics.fanout_cut.labels(reason="slow")
        metrics.watch(metrics.fanout_subscribers, lambda: self.hub.count)

    def startService(self) -> None:
        """Start the reader and the heartbeat."""
        super().startService()
        self._heartbeat.start(HEARTBEAT_VISIT / HEARTBEAT_SLICES, now=False)

    def _beat(self) -> None:
        """``: ping`` to this tick's slice of the subscribers."""
        self._tick = (self._tick + 1) % HEARTBEAT_SLICES
        self.hub.broadcast(HEARTBEAT, self._tick)

    def stopService(self) -> Deferred[Any]:
        """End every subscription cleanly (browsers reconnect elsewhere), stop reading."""
        if self._heartbeat.running:
            self._heartbeat.stop()
        for sub in list(self.hub.subscribers()):
            sub.close()
            self.hub.remove(sub)
        stopped: Deferred[Any] = super().stopService()
        return stopped

    def subscribe(self, request: Any, stream: bytes) -> None:
        """Serve one subscription of `stream` (problems are answered as such)."""
        raw = request.requestHeaders.getRawHeaders(b"last-event-id")
        last: Optional[bytes] = raw[0].strip() if raw else None
        if not last:
            query = request.args.get(b"last_event_id") if request.args else None
            last = query[0].strip() if query else None
        resume: Optional[StreamId] = None
        if last:
            try:
                resume = parse_id(last)
            except ValueError as e:
                raise BadRequest(f"Last-Event-ID {last.decode('ascii', 'replace')!r}: {e}") from None
        if not self._redis.ready:
            raise NotReady("Redis is unreachable; subscribe again shortly", retry_after=5)
        d = self._start(request, stream, resume)
        d.addErrback(self._failed, request)

    @inlineCallbacks
    def _start(self, request: Any, stream: bytes, resume: Optional[StreamId]) -> Any:
        gone = request.notifyFinish()
        gone.addErrback(lambda _: None)  # a client leaving is no error (checked with gone.called)
        newest_reply = yield self._redis.execute(b"XREVRANGE", stream, b"+", b"-", b"COUNT", b"1")
        newest = parse_id(newest_reply[0][0]) if newest_reply else ZERO
        if resume is not None and resume > newest and resume[0] / 1000.0 > self._reactor.seconds() + FUTURE_SKEW:
            raise BadRequest(f"Last-Event-ID {format_id(resume).decode()} is in the future")
        if gone.called:
            return
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")  # nginx: do not buffer the stream
        request.write(retry_field(RETRY_BASE_MS + self._rng.randrange(RETRY_JITTER_MS)))
        sub = Subscriber(request, stream, resume if resume is not None else newest, self._queue_limit, self._on_cut)
        hub = self.hub
        hub.add(sub, newest)
        gone.addBoth(self._gone, sub)
        if resume is None:
            return
        sub.catching_up = True
        while not sub.closed:
            page = yield self._redis.execute(
                b"XRANGE", stream, b"(" + format_id(sub.cursor), b"+", b"COUNT", b"%d" % REPLAY_PAGE
            )
            hub.replay(sub, page or [])
            if len(page or ()) < REPLAY_PAGE:
                position = hub.position(stream)
                if not page or position is None or position <= sub.cursor:
                    sub.catching_up = False  # same turn as the check: nothing slips between
                    return

    def _failed(self, failure: Any, request: Any) -> None:
        from relayd.ingest.app import write_problem  # the one problem renderer

        if request.finished or getattr(request, "_disconnected", False):
            return
        if failure.check(Problem):
            problem = failure.value
        else:
            problem = NotReady("could not read the stream from Redis; subscribe again shortly", retry_after=5)
        if request.startedWriting:
            request.channel.transport.loseConnection()
            return
        body = write_problem(request, problem)
        request.write(body)
        request.finish()

    def _gone(self, _: Any, sub: Subscriber) -> None:
        sub.closed = True
        self.hub.remove(sub)

    def _on_cut(self, sub: Subscriber) -> None:
        self._cut.inc()
        self.hub.remove(sub)
