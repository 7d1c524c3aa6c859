"""The forwarder: the one owner of how messages leave this process.

It drains the buffer (`relayd.outbox.buffer`) in batches and decides, alone,
between two modes:

direct
    Each batch is written to Redis by the one writer (`relayd.outbox.writer`):
    one command per target (``LPUSH key v1 .. vN`` for a list), about one
    round trip whatever N is (5-13x cheaper per message than single
    LPUSHes).  Everything that arrives within one reactor turn, and all
    that piles up while `max_in_flight` batches are outstanding, leaves as
    one batch, so batches grow with load by themselves.

spill
    Each batch is appended to the disk spool (`relayd.outbox.spooler`) and
    settled when its group commit is durable; the replay loop
    (`relayd.outbox.replay`) pushes the spool to Redis, oldest first.

Spill mode starts when Redis is down (on a cluster: every primary), when
the buffer passes its high-water mark (Redis is up but slower than ingest),
or at start when the spool still holds records from before.  It ends only
when the spool is empty again, so for every target all new messages queue
*behind* the spooled ones: FIFO per target holds across an outage.

Per target, in direct mode: a write that fails (its cluster node died, its
key has the wrong type) spools that target's share of the batch at once,
and so does a batch share whose node is known to be down; the other
targets' shares go on to Redis and their requests are answered.  From then
on the target has a *backlog* (`relayd.outbox.backlog`): its new messages
go to the spool too, behind its older ones, until the replay has stored
all of them; then it goes direct again.  So a failed primary of a cluster
costs only its own lists a detour through the disk, and each list stays
FIFO.  (One exception, per target or for all: a batch that was on the wire
when the failure began may be stored ahead of an earlier one that failed
and was spooled.)

Settlement: every taken entry ends in exactly one of `settle_stored`
(Redis replied, or the spool commit is durable), `settle_failed` (nothing
can store it and its request can be told so truthfully) or `requeue` (try
again).  A batch the spool refuses (full, disk error) while nothing else
can store it fails at once the stored-ack requests none of whose messages
is stored or on its way: a prompt 503, never a wait for the ack timeout.

Order on failure when the spool cannot take the failed share either: the
forwarder waits until nothing is in flight, then puts every failed batch
back at the front of the buffer in its original order.
A command that timed out may still have been executed by Redis, so a retry
can push a message twice: delivery is at-least-once (consumers dedupe by
id).  A Redis that stops replying costs a batch at most ``[redis]
reply_timeout`` (1 s by default) before it fails and spills.
"""

from __future__ import annotations

import random
from itertools import chain
from operator import itemgetter
from typing import Any, Callable, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.ops.metrics import Metrics
from relayd.outbox.backlog import SpoolBacklog
from relayd.outbox.buffer import NotStored, RingBuffer, Run
from relayd.outbox.replay import Replayer
from relayd.outbox.spooler import RETRY_AFTER_ERROR, Spooler
from relayd.outbox.targets import Target, encode_payload
from relayd.outbox.writer import RedisWriter
from relayd.redis.client import ResponseError, TimeoutError
from relayd.spool.errors import SpoolFull, SpoolWriteError

_TARGET, _ITEMS, _WAITER = itemgetter(0), itemgetter(1), itemgetter(2)
#: From this many runs a batch (single-message requests, mostly) is grouped
#: by C-level sets when it has one target, not by a Python loop per run.
_SET_MIN = 8

HIGH_WATER = 0.5  # spill once the buffer is half full: Redis is slower than ingest
SPILL_RETRY = 0.1  # seconds before retrying a spill the spool refused
RETRY_INITIAL_DELAY = 0.05  # seconds; a blip costs little latency
RETRY_MAX_DELAY = 2.0  # seconds; bounded so recovery is quick once Redis answers
DRAIN_POLL = 0.01  # seconds between drain checks during shutdown
MODE_LOG_INTERVAL = 10.0  # seconds between spill/direct log lines
#: Retry-After of a 503 when nothing can store: about when the spool's
#: refusal window ends or Redis reconnects.
RETRY_AFTER_NOT_STORED = int(RETRY_AFTER_ERROR) + 1


class Forwarder(Service):
    """Moves entries from the buffer to Redis or the spool; settles them."""

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        buffer: RingBuffer,
        redis: Any,
        writer: RedisWriter,
        spooler: Spooler,
        metrics: Metrics,
        batch_messages: int,
        batch_bytes: int,
        max_in_flight: int,
        shutdown_timeout: float = 30.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """`redis` is the client (for readiness notices); `writer` writes through it."""
        self._reactor = reactor
        self._buffer = buffer
        self._redis = redis
        self._writer = writer
        self._spooler = spooler
        self._metrics = metrics
        self._high_messages = int(buffer.max_messages * HIGH_WATER)
        self._high_bytes = int(buffer.max_bytes * HIGH_WATER)
        self._batch_messages = batch_messages
        self._batch_bytes = batch_bytes
        self._max_in_flight = max_in_flight
        self._jitter = jitter
        self._shutdown_timeout = shutdown_timeout
        self._in_flight = 0
        self._seq = 0
        self._failed: List[Tuple[int, List[Run]]] = []
        self._failures_in_row = 0
        self._wakeup: Optional[IDelayedCall] = None  # pending DelayedCall of _pump
        self._pumping = False
        self._retry_at: Optional[float] = None
        self.spilling = False
        self._replayer: Optional[Replayer] = None
        #: Targets whose new messages go to the spool behind their older ones.
        self._backlog = SpoolBacklog()
        self._mode_logged_at = -MODE_LOG_INTERVAL
        self._mode_suppressed = 0

    # -- lifecycle -------------------------------------------------------

    def startService(self) -> None:
        """Listen for new entries and for Redis becoming ready; replay the spool."""
        super().startService()
        spool = self._spooler.spool
        assert spool is not None, "the spooler starts (and opens the spool) first"
        self._replayer = Replayer(
            self._reactor,
            spool,
            self._writer,
            self._metrics,
            self._spooler.acked,
            self._maybe_go_direct,
            backlog=self._backlog,
        )
        backlog = self._backlog
        self._metrics.watch(self._metrics.spill_targets, lambda: float(len(backlog)))
        if self._spooler.pending:
            self._enter_spill("recovery")
        self._buffer.set_listener(self.wake)
        self._redis.on_ready(self._redis_ready)
        self._replayer.start()
        self.wake()

    def stopService(self) -> Deferred[bool]:
        """Push everything still in memory; then let the replay's batches on the wire settle.

        Fires True when the buffer drained, False after the shutdown
        timeout.  The caller stops ingest first, so the buffer only shrinks.
        """
        super().stopService()
        done: Deferred[bool] = Deferred()
        timeout = self._shutdown_timeout
        deadline = self._reactor.seconds() + timeout

        def finish(result: bool) -> None:
            replayer = self._replayer
            d = replayer.stop() if replayer is not None else Deferred()
            if replayer is None:
                d.callback(None)
            d.addBoth(lambda _: done.callback(result))

        def check() -> None:
            if self._buffer.messages == 0:
                finish(True)
            elif self._reactor.seconds() >= deadline:
                self._log.error(
                    "shutdown: {count} messages still in memory after {timeout}s; they are lost",
                    count=self._buffer.messages,
                    timeout=timeout,
                )
                finish(False)
            else:
                self.wake()
                self._reactor.callLater(DRAIN_POLL, check)

        check()
        return done

    @property
    def in_flight(self) -> int:
        """Batches (one command per target they touch) awaiting replies."""
        return self._in_flight

    def can_store(self, count: int = 1, size: int = 0) -> bool:
        """Could `count` messages of `size` bytes be stored now (ingest, /readyz)?

        In spill mode only the spool can take them (FIFO); in direct mode
        Redis (on a cluster: some primary; a message for a failed one is
        answered 503 promptly if the spool refuses it) or, should it fail,
        the spool.
        """
        if self.spilling:
            return self._spooler.can_take(count, size)
        return self._writer.any_ready or self._spooler.can_take(count, size)

    # -- mode --------------------------------------------------------------

    def _enter_spill(self, reason: str) -> None:
        if not self.spilling:
            self.spilling = True
            self._metrics.spill_mode.set(1)
            self._log_mode(f"spilling to disk: {reason}")

    def _maybe_go_direct(self) -> None:
        """Leave spill mode once nothing is spooled or on its way and Redis is ready."""
        drained = not self._spooler.pending and not (self._replayer is not None and self._replayer.busy)
        if drained:
            self._backlog.clear()  # nothing spooled: no target has a backlog (whatever the counts say)
        if self.spilling and drained and self._writer.any_ready:
            self.spilling = False
            self._metrics.spill_mode.set(0)
            self._log_mode("spool drained; pushing directly to Redis again")
            self.wake()

    def _log_mode(self, message: str) -> None:
        """Log mode switches, at most once per `MODE_LOG_INTERVAL` (flapping must not flood)."""
        now = self._reactor.seconds()
        if now - self._mode_logged_at >= MODE_LOG_INTERVAL:
            suffix = f" ({self._mode_suppressed} more switches not logged)" if self._mode_suppressed else ""
            self._log.info("{message}{suffix}", message=message, suffix=suffix)
            self._mode_logged_at = now
            self._mode_suppressed = 0
        else:
            self._mode_suppressed += 1

    # -- scheduling ------------------------------------------------------

    def wake(self) -> None:
        """Schedule a pump on the next reactor turn (coalesced)."""
        if self._wakeup is None and self._retry_at is None:
            self._wakeup = self._reactor.callLater(0, self._pump)

    def _redis_ready(self) -> None:
        if self._retry_at is not None and self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
            self._wakeup = None
        self._retry_at = None
        if self._replayer is not None:
            self._replayer.kick()
        self.wake()

    def _pump(self) -> None:
        self._wakeup = None
        if self._pumping:  # re-entered from a synchronous reply: the outer loop continues
            return
        self._pumping = True
        try:
            self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        buffer = self._buffer
        if buffer.queued and not self.spilling:
            if not self._writer.any_ready:
                self._enter_spill("redis unavailable")
            elif (buffer.messages > self._high_messages or buffer.bytes > self._high_bytes) and self._spooler.can_take(
                1, 0
            ):
                self._enter_spill("buffer above high-water mark")
        while buffer.queued:
            if self.spilling:
                batch = buffer.take(self._batch_messages, self._batch_bytes)
                if batch and not self._spill(batch):
                    if not self.spilling:
                        continue  # the spool was empty: pushing directly keeps FIFO
                    self._retry_at = self._reactor.seconds() + SPILL_RETRY
                    self._wakeup = self._reactor.callLater(SPILL_RETRY, self._retry)
                    return
            elif (
                self._in_flight < self._max_in_flight
                and self._writer.any_ready
                and not self._failed  # failed batches go first (after requeue)
                and self._retry_at is None
            ):
                batch = buffer.take(self._batch_messages, self._batch_bytes)
                if batch and not self._send(batch):
                    # The spool refused a share that cannot go direct (its
                    # node is down): it is back in the buffer; retry shortly.
                    self._retry_at = self._reactor.seconds() + SPILL_RETRY
                    self._wakeup = self._reactor.callLater(SPILL_RETRY, self._retry)
                    return
            else:
                return

    # -- spill -------------------------------------------------------------

    def _spill(self, batch: List[Run], per_target: bool = False) -> bool:
        """Append `batch` to the spool; settle it when durable.  False if refused.

        `per_target`: the batch is the share of targets that cannot go
        direct while the rest does (spill mode is off): a refusal answers
        their requests as in spill mode.
        """
        if self._append(batch):
            return True
        self._refused(batch, per_target)
        return False

    def _append(self, batch: List[Run]) -> bool:
        """Append `batch` to the spool and count it in the backlog; False if refused (nothing written)."""
        payloads = [encode_payload(target, item) for target, items, _, _ in batch for item in items]
        size = 0
        for p in payloads:
            size += len(p)
        spooler = self._spooler
        if spooler.can_take(len(payloads), size):
            try:
                d = spooler.append(payloads)
            except (SpoolFull, SpoolWriteError):
                pass
            else:
                counts: dict[Target, int] = {}
                for target, items, waiter, _ in batch:
                    if waiter is not None:
                        waiter.exposed = True
                    counts[target] = counts.get(target, 0) + len(items)
                backlog = self._backlog
                for target, count in counts.items():
                    backlog.spooled(target, count)
                d.addCallbacks(self._spilled, self._commit_failed, callbackArgs=(batch,), errbackArgs=(batch,))
                if self._replayer is not None:
                    d.addCallback(lambda _: self._replayer.kick() if self._replayer is not None else None)
                return True
        return False

    def _spilled(self, _: object, batch: List[Run]) -> None:
        self._buffer.settle_stored(batch)

    def _commit_failed(self, failure: Failure, batch: List[Run]) -> None:
        # The records are on disk but not known durable: the request gets a
        # 503 that says they may still be delivered (replay may push them).
        self._buffer.settle_failed(
            batch,
            NotStored(
                "the disk spool could not fsync; the messages may or may not be delivered",
                retry_after=RETRY_AFTER_NOT_STORED,
                maybe_stored=True,
            ),
        )

    def _refused(self, batch: List[Run], per_target: bool = False) -> None:
        """The spool refused `batch`: keep what must be kept, answer what can be answered."""
        self._buffer.requeue(batch)
        self._maybe_go_direct()  # an empty spool and a ready Redis: push directly instead
        if not self.spilling and not per_target:
            return
        untouched = NotStored("neither Redis nor the disk spool can take messages now", RETRY_AFTER_NOT_STORED)
        exposed = NotStored(
            "neither Redis nor the disk spool can take messages now; an earlier attempt may have stored some",
            RETRY_AFTER_NOT_STORED,
            maybe_stored=True,
        )
        for _, _, waiter, _ in batch:
            # Its queued entries are dropped by the next take.  One with
            # entries still in hand (stored or on the wire) waits for them.
            if waiter is not None and not waiter.cancelled and waiter.taken == 0:
                waiter.fail(untouched if waiter.untouched else exposed)

    # -- direct ------------------------------------------------------------

    def _send(self, batch: List[Run]) -> bool:
        """Write each target's share to Redis, or to the spool if it must not go direct.

        False when the spool refused a share that cannot go direct (it is
        back at the front of the buffer); the rest was sent.
        """
        groups: dict[Target, List[Run]] = {}
        if len(batch) >= _SET_MIN and len(targets := set(map(_TARGET, batch))) == 1:
            groups[targets.pop()] = batch  # one target (one route): no grouping per run
            for waiter in set(map(_WAITER, batch)):
                if waiter is not None:
                    waiter.exposed = True
        else:
            for run in batch:
                group = groups.get(run[0])
                if group is None:
                    groups[run[0]] = [run]
                else:
                    group.append(run)
                if run[2] is not None:
                    run[2].exposed = True
        sent = True
        backlog = self._backlog
        if backlog or not self._writer.ready:
            # Some target has spooled records, or some node is down: those
            # targets' shares go to the spool, behind their older records.
            ready_for = self._writer.ready_for
            detour = [t for t in groups if t in backlog or not ready_for(t)]
            if detour:
                spill: List[Run] = []
                for target in detour:
                    spill.extend(groups.pop(target))
                sent = self._spill(spill, per_target=True)
                if not groups:
                    return sent
        self._in_flight += 1
        pending = [len(groups)]  # commands of this batch still awaiting a reply
        write = self._writer.write
        for target, entries in groups.items():
            self._seq += 1
            # One run (an NDJSON request, or a batch of one): its item list as it is.
            items = entries[0][1] if len(entries) == 1 else list(chain.from_iterable(map(_ITEMS, entries)))
            d = write(target, items)
            d.addCallbacks(
                self._pushed,
                self._push_failed,
                callbackArgs=(entries, pending),
                errbackArgs=(self._seq, entries, pending),
            )
        return sent

    def _command_done(self, pending: List[int]) -> None:
        pending[0] -= 1
        if pending[0] == 0:
            self._in_flight -= 1

    def _pushed(self, outcomes: Optional[List[Optional[bytes]]], entries: List[Run], pending: List[int]) -> None:
        self._command_done(pending)
        self._failures_in_row = 0
        self._buffer.settle_stored(entries, outcomes)
        self._settle()

    def _push_failed(self, failure: Failure, seq: int, entries: List[Run], pending: List[int]) -> None:
        self._command_done(pending)
        if failure.check(TimeoutError):
            kind = "timeout"
        elif failure.check(ResponseError):
            kind = "response"
        else:
            kind = "connection"
        self._metrics.redis_errors.labels(kind=kind).inc()
        if self._failures_in_row == 0:
            self._log.warn("redis push failed ({kind}): {error}; will retry", kind=kind, error=failure.getErrorMessage())
        self._failures_in_row += 1
        if not self._failed and self._append(entries):
            # This target's share goes through the spool; its later messages
            # follow it there (backlog), the other targets stay direct.
            # (Not while earlier failures wait for a requeue: they go first.)
            self._settle()
            return
        self._failed.append((seq, entries))
        if not self._writer.per_node:
            self._enter_spill(f"redis push failed ({kind})")
        self._settle()

    def _settle(self) -> None:
        """After a reply: requeue failures once nothing is in flight, else pump."""
        if self._failed and self._in_flight == 0:
            self._failed.sort(key=lambda f: f[0])
            for _, entries in reversed(self._failed):
                self._buffer.requeue(entries)
            self._failed = []
            if self.spilling and self._spooler.can_take(1, 0):
                self.wake()  # spill them now; the replay retries Redis
                return
            delay = min(RETRY_INITIAL_DELAY * 2 ** min(self._failures_in_row, 16), RETRY_MAX_DELAY)
            delay *= 0.5 + self._jitter()
            if self._wakeup is not None and self._wakeup.active():
                self._wakeup.cancel()
            self._retry_at = self._reactor.seconds() + delay
            self._wakeup = self._reactor.callLater(delay, self._retry)
        elif not self._failed and self._retry_at is None:
            if self._buffer.queued and self._wakeup is None:
                self._pump()

    def _retry(self) -> None:
        self._retry_at = None
        self._pump()
