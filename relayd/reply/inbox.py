"""This process's reply list: one blocking reader, waiting requests matched by id.

Each worker process owns one private list (`reply_list_name`: host, pid and
a random part, so processes and hosts never collide), named in the
``reply_to`` of every request envelope it pushes.  One reader loop on its
own Redis connection (a blocking BRPOP holds its connection) pops replies
and hands each to the request waiting for that id.  Not a reply key per
request: a BLPOP per request costs a connection or a round trip per
request (celery/ceps#7).

- No reply within the route's ``reply_timeout``: the request gets 504, its
  entry is dropped, and a reply that comes later is counted as *late* and
  dropped.  It never reaches another request and never stops the reader
  (nats.net#167: a timeout tore down the shared inbox).
- A reply that cannot be relayed (not JSON, no id, bad status or headers)
  is counted as *malformed*, logged at most once per `LOG_INTERVAL`, and the
  request with its id (if any) gets 502.
- A client that leaves frees its entry at once.

Dead processes: a list whose owner died would keep every reply pushed to
it.  Each process records its list in a registry (`REGISTRY`, a sorted set
scored by last heartbeat) every `HEARTBEAT` seconds; any live process
deletes the lists whose owner has not beaten for `DEAD_AFTER` seconds, on
every pass until `FORGET_AFTER` (replies to a dead process that arrive later
are deleted on the next pass).  The list itself also gets an EXPIRE while
it exists (thrau/pymq#1, celery#2001: replies of dead processes piling up).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Dict, Generator, Optional, Tuple

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.config import RedisConfig
from relayd.ops.metrics import Metrics
from relayd.redis.client import ConnectionError, TimeoutError
from relayd.redis.factory import make_redis_client
from relayd.reply.protocol import MalformedReply, Reply, parse_reply
from relayd.reply.take import TAKE_PACKED, unpack_replies

REGISTRY = b"relayd:reply-lists"
BLOCK_SECONDS = 1  # BRPOP block: bounds how long a stop waits for the reader
DRAIN_BATCH = 256  # RPOP count after each BRPOP: replies arrive in bursts
HEARTBEAT = 10.0  # seconds between registry updates
DEAD_AFTER = 60.0  # seconds without a heartbeat before a list is deleted
FORGET_AFTER = 24 * 3600.0  # seconds a dead list is still swept (late replies recreate it)
LOG_INTERVAL = 10.0  # seconds between malformed-reply log lines


class ReplyTimeout(Exception):
    """No reply within the route's reply_timeout."""


class ReplyUnusable(Exception):
    """The matching reply was malformed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def reply_list_name() -> bytes:
    """A list name no other process or host uses."""
    return b"relayd:reply:%s:%d:%s" % (socket.gethostname().encode(), os.getpid(), os.urandom(4).hex().encode())


class ReplyInbox(Service):
    """Reads this process's reply list and completes waiting requests."""

    _log = Logger()

    def __init__(self, reactor: IReactorTime, redis_config: RedisConfig, metrics: Metrics, name: Optional[bytes] = None) -> None:
        self._reactor = reactor
        self.list_name: bytes = name if name is not None else reply_list_name()
        # The reader's own connection (one per primary on a cluster): a BRPOP holds it for BLOCK_SECONDS.
        self._redis = make_redis_client(reactor, attrs.evolve(redis_config, reply_timeout=BLOCK_SECONDS + 2.0))
        self._metrics = metrics
        self._waiting: Dict[str, Tuple[Deferred[Reply], IDelayedCall, float]] = {}  # id -> (deferred, timer, started)
        self._reading: Optional[Deferred[None]] = None
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = reactor
        self._logged_at = -LOG_INTERVAL
        self._matched = metrics.replies.labels(outcome="matched")  # per reply: no label lookup
        self._late = metrics.replies.labels(outcome="late")
        metrics.watch(metrics.reply_waiting, lambda: len(self._waiting))

    @property
    def ready(self) -> bool:
        """The reader's connection is up (so Redis is)."""
        return self._redis.ready

    def startService(self) -> None:
        """Connect, start reading and beating."""
        super().startService()
        self._redis.startService()
        self._redis.on_ready(self._kick)
        self._heartbeat.start(HEARTBEAT, now=False)

    def stopService(self) -> Deferred[Any]:
        """Stop reading; waiting requests time out on their own (ingest stopped first)."""
        super().stopService()
        if self._heartbeat.running:
            self._heartbeat.stop()
        for d, timer, _ in list(self._waiting.values()):
            if timer.active():
                timer.cancel()
            d.errback(ReplyTimeout("relayd is stopping"))
        self._waiting.clear()
        return self._redis.stopService()

    # -- waiting requests ----------------------------------------------------

    def wait(self, request_id: str, timeout: float) -> Deferred[Reply]:
        """A Deferred of the `Reply` to `request_id`; fails `ReplyTimeout` or `ReplyUnusable`."""
        d: Deferred[Reply] = Deferred(lambda _: self._drop(request_id))  # cancel() frees the entry too
        timer = self._reactor.callLater(timeout, self._expire, request_id)
        self._waiting[request_id] = (d, timer, self._reactor.seconds())
        return d

    def forget(self, request_id: str) -> None:
        """The request went away (client gone, not stored): drop its entry now.

        Its Deferred is cancelled (fails with `CancelledError`) at once, so
        that whatever waits on it ends (a request left hanging would hold a graceful stop
        for the whole shutdown timeout); a Deferred nobody will wait on must
        be given an errback by the caller.
        """
        entry = self._waiting.get(request_id)
        if entry is not None:
            entry[0].cancel()  # `_drop`, then CancelledError

    def _drop(self, request_id: str) -> None:
        """The canceller of a wait: drop the entry and its timer."""
        entry = self._waiting.pop(request_id, None)
        if entry is not None and entry[1].active():
            entry[1].cancel()

    def _expire(self, request_id: str) -> None:
        entry = self._waiting.pop(request_id, None)
        if entry is not None:
            self._metrics.reply_timeouts.inc()
            entry[0].errback(ReplyTimeout("no reply in time"))

    # -- the reader ------------------------------------------------------------

    def _kick(self) -> None:
        if self._reading is None and self.running:
            self._reading = self._read()
            self._reading.addErrback(self._reader_failed)
            self._beat()

    def _reader_failed(self, failure: Failure) -> None:
        self._log.failure("reply reader stopped unexpectedly", failure)

    @inlineCallbacks
    def _read(self) -> Generator[Deferred[Any], Any, None]:
        """Take what is there (`TAKE_PACKED`), block (BRPOP) only when the list is empty.

        Busy: one round trip, and one bulk string to parse, per burst of up
        to `DRAIN_BATCH` replies.  Idle: the BRPOP's reply is delivered as
        soon as it arrives, before the next take looks for more.  Until
        stopped or disconnected.
        """
        redis, name = self._redis, self.list_name
        drain, block = (b"%d" % DRAIN_BATCH,), b"%d" % BLOCK_SECONDS
        try:
            while self.running and redis.ready:
                try:
                    items = unpack_replies((yield TAKE_PACKED.run(redis, (name,), drain)))
                    if not items:
                        popped = yield redis.execute(b"BRPOP", name, block)
                        if popped is not None:
                            items = [popped[1]]
                except Exception as e:
                    if not self.running or not redis.ready or isinstance(e, (ConnectionError, TimeoutError)):
                        break  # connection lost or reset: on_ready starts a new reader
                    # Redis refused (e.g. WRONGTYPE: someone overwrote the list): keep reading, slowly.
                    self._log.warn("reply reader: reading {name} failed ({error}); retrying in {s}s",
                                   name=name.decode(), error=str(e), s=BLOCK_SECONDS)
                    yield deferLater(self._reactor, BLOCK_SECONDS, lambda: None)
                    continue
                for raw in items:
                    self._deliver(raw)
        finally:
            self._reading = None

    def _deliver(self, raw: bytes) -> None:
        try:
            reply: Reply = parse_reply(raw)
        except MalformedReply as e:
            self._metrics.replies.labels(outcome="malformed").inc()
            self._log_malformed(e.reason)
            if e.request_id is not None:
                entry = self._waiting.pop(e.request_id, None)
                if entry is not None:
                    entry[1].cancel()
                    entry[0].errback(ReplyUnusable(e.reason))
            return
        entry = self._waiting.pop(reply.request_id, None)
        if entry is None:
            self._late.inc()
            return
        d, timer, started = entry
        timer.cancel()
        self._matched.inc()
        self._metrics.reply_roundtrip.observe(self._reactor.seconds() - started)
        d.callback(reply)

    def _log_malformed(self, reason: str) -> None:
        now = self._reactor.seconds()
        if now - self._logged_at >= LOG_INTERVAL:
            self._logged_at = now
            self._log.warn("malformed reply on {name}: {reason}", name=self.list_name.decode(), reason=reason)

    # -- heartbeat and dead lists ---------------------------------------------------

    def _beat(self) -> None:
        """Record this list as alive; delete the lists of processes that stopped beating."""
        if not self._redis.ready:
            return
        d = self._sweep()
        d.addErrback(lambda _: None)  # Redis gone: the next beat tries again

    @inlineCallbacks
    def _sweep(self) -> Generator[Deferred[Any], Any, None]:
        now = self._reactor.seconds()
        execute = self._redis.execute
        yield execute(b"ZADD", REGISTRY, b"%f" % now, self.list_name)
        yield execute(b"EXPIRE", self.list_name, b"%d" % int(DEAD_AFTER))
        dead = yield execute(b"ZRANGEBYSCORE", REGISTRY, b"-inf", b"%f" % (now - DEAD_AFTER), b"LIMIT", b"0", b"100")
        for name in dead or ():
            yield execute(b"DEL", name)
        yield execute(b"ZREMRANGEBYSCORE", REGISTRY, b"-inf", b"%f" % (now - FORGET_AFTER))
