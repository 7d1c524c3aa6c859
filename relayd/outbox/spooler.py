"""Spill and replay: the disk path between the buffer and Redis.

`Spooler` owns this worker's `Spool` (relayd/spool/store.py) and switches the
daemon between two modes:

direct
    The forwarder pushes buffer batches straight to Redis (the fast path).

spill
    The forwarder appends buffer batches to the spool instead; stored-ack
    requests are answered once their records are fsynced (group commit), and
    a replay loop pushes spooled records to Redis, oldest first, acking each
    batch after Redis replied.

Spill mode starts when Redis is down or failing, when the buffer passes its
high-water mark (Redis is up but slower than ingest), or at start-up when
the spool still holds records from before a crash.  It ends only when the
spool is empty again, so for every list all new messages queue *behind* the
spooled ones: FIFO per list holds across an outage.  (One exception: a batch
that was on the wire to Redis when the outage began fails and is spilled
after messages that arrived meanwhile.)

Group commit: with ``fsync = "batch"``, records appended within
`COMMIT_WINDOW` share one fsync, then all of their requests are answered;
``"always"`` syncs on the next reactor turn (still one fsync for everything
appended in that turn); ``"never"`` answers after the write to the page
cache (survives a process crash, not a power loss).

The fsync runs in a thread (`Spool.begin_sync` hands the thread its own
file descriptors; `run_sync` touches nothing else), one commit at a time:
while it runs, the reactor keeps answering, appending and replaying, and
what is appended meanwhile becomes the next group.  On the reactor thread
the 1-5 ms fsync stalled ingest: single-POST spill went from 2.7-4.7k to
5.9k req/s and its p99 from 61-413 ms to 35 ms (bench/spool_daemon.py).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.outbox.buffer import Entry, RingBuffer
from relayd.ops.metrics import Metrics
from relayd.ingest.problems import NotReady
from relayd.redis.client import RedisClient
from relayd.spool.errors import SpoolFull, SpoolWriteError
from relayd.spool.record import decode_entry, encode_entry
from relayd.spool.segments import DEFAULT_SEGMENT_BYTES as SEGMENT_BYTES
from relayd.spool.spool import Spool
from relayd.spool.sync import SyncPlan, run_sync

COMMIT_WINDOW = 0.002  # seconds: a 2 ms window lets ~hundreds of requests share one fsync
RETRY_AFTER_ERROR = 1.0  # seconds before writing again after ENOSPC/EIO
REPLAY_RETRY = 0.5  # seconds between replay attempts while Redis fails
REPLAY_PIPELINE = 3  # batches on the wire: hides the round trip behind decoding the next
REPLAY_MAX_RECORDS = 1000  # one LPUSH per list per batch, like the forwarder
REPLAY_MAX_BYTES = 1024 * 1024
MIN_RECORD_BYTES = 64  # framing (16 B) + entry header + a tiny envelope: less room is no room
MODE_LOG_INTERVAL = 10.0  # seconds between spill/direct log lines


def push_records(redis: RedisClient, records: List[Tuple[Any, bytes]]) -> Tuple[Deferred, Dict[bytes, int]]:
    """LPUSH spooled records to Redis: one command per list, arrival order kept.

    Returns the Deferred of all replies and the message count per list (for
    the ``forwarded`` metric).  Shared by the spooler's replay and the
    adoption of orphaned spools.
    """
    groups: Dict[bytes, List[bytes]] = {}
    for _, payload in records:
        key, item = decode_entry(payload)
        group = groups.get(key)
        if group is None:
            groups[key] = [item]
        else:
            group.append(item)
    d = gatherResults([redis.lpush(k, items) for k, items in groups.items()], consumeErrors=True)
    return d, {k: len(v) for k, v in groups.items()}


class Spooler(Service):
    """This worker's disk spillover: spill, group commit, replay."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        path: str,
        max_bytes: int,
        fsync: str,
        buffer: RingBuffer,
        redis: RedisClient,
        metrics: Metrics,
        segment_bytes: int = SEGMENT_BYTES,
        commit_window: float = COMMIT_WINDOW,
        run_in_thread: Optional[Callable[..., Deferred]] = None,
    ) -> None:
        """`run_in_thread(f, *args)` runs the fsyncs off the reactor thread;
        by default the reactor's thread pool (inline when it has none, e.g.
        a test clock)."""
        self._reactor = reactor
        self._path = path
        self._max_bytes = max_bytes
        self._fsync = fsync
        self._buffer = buffer
        self._redis = redis
        self._metrics = metrics
        self._segment_bytes = segment_bytes
        self._commit_window = commit_window
        if run_in_thread is None:
            if hasattr(reactor, "getThreadPool"):
                def run_in_thread(f: Callable[..., Any], *args: Any) -> Deferred:
                    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
            else:
                def run_in_thread(f: Callable[..., Any], *args: Any) -> Deferred:
                    return maybeDeferred(f, *args)
        self._run_in_thread = run_in_thread
        self._syncing: Optional[Deferred] = None
        self.spool: Optional[Spool] = None
        self.active = False  # spill mode
        self._reason = ""
        self._uncommitted: List[List[Entry]] = []
        self._commit_call: Any = None
        self._blocked_until = 0.0  # after SpoolFull / write errors
        self._replay_inflight: List[Deferred] = []  # batches on the wire, oldest first
        self._replay_after: Optional[Tuple[int, int, int]] = None  # last record read ahead
        self._replay_broken = False  # a batch failed: ack nothing until all settled
        self._replay_call: Any = None
        self._mode_listeners: List[Callable[[], None]] = []
        self._mode_logged_at = -MODE_LOG_INTERVAL
        self._mode_suppressed = 0

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        """Open (and recover) the spool; enter spill mode if it holds records.

        Called before the ingest port is bound, so nothing is accepted ahead
        of records left by a crash.
        """
        os.makedirs(self._path, exist_ok=True)
        self.spool = Spool.open(
            self._path,
            self._max_bytes,
            segment_bytes=self._segment_bytes,
            fsync=self._fsync,
            clock=self._reactor.seconds,
        )
        m = self._metrics
        m.spool_corrupt.inc(self.spool.corrupt_records)
        m.watch(m.spool_messages, lambda: self.spool.pending_records if self.spool else 0)
        m.watch(m.spool_bytes, lambda: self.spool.pending_bytes if self.spool else 0)
        m.watch(m.spool_oldest_age, self._oldest_age)
        if self.spool.corrupt_records:
            self._log.warn(
                "spool recovery skipped {count} corrupt records (copied to {path}/quarantine)",
                count=self.spool.corrupt_records,
                path=self._path,
            )
        if self.spool.pending_records:
            self._log.info(
                "spool holds {count} records from before; replaying", count=self.spool.pending_records
            )
            self.activate("recovery")

    def _oldest_age(self) -> float:
        oldest = self.spool.oldest_timestamp if self.spool else None
        return 0.0 if oldest is None else max(0.0, self._reactor.seconds() - oldest)

    def privilegedStartService(self) -> None:
        """Open the spool before listeners bind (twistd runs this first)."""
        super().privilegedStartService()
        if self.spool is None:
            self.open()

    def startService(self) -> None:
        """Start replaying when Redis is ready."""
        if self.spool is None:
            self.open()
        super().startService()
        self._redis.on_ready(self._kick_replay)
        self._kick_replay()

    def stopService(self) -> Deferred:
        """Wait for a replay batch on the wire, commit what was spilled, close."""
        super().stopService()
        for call in (self._replay_call, self._commit_call):
            if call is not None and call.active():
                call.cancel()
        self._replay_call = self._commit_call = None
        pending = list(self._replay_inflight) + ([self._syncing] if self._syncing is not None else [])
        d = DeferredList(pending) if pending else succeed(None)

        def close(_: object) -> None:
            self._commit(inline=True)
            if self.spool is not None:
                left = self.spool.pending_records
                self.spool.close()
                self._log.info("spool closed with {count} records to replay at next start", count=left)

        return d.addBoth(close)

    # -- mode --------------------------------------------------------------

    def on_mode_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` when spill mode ends (the forwarder goes direct again)."""
        self._mode_listeners.append(listener)

    def activate(self, reason: str) -> None:
        """Enter spill mode (idempotent)."""
        if not self.active:
            self.active = True
            self._reason = reason
            self._metrics.spill_mode.set(1)
            self._log_mode(f"spilling to disk: {reason}")
        self._kick_replay()

    def leave_if_idle(self) -> bool:
        """Leave spill mode if nothing is spooled or being spooled and Redis is ready.

        Returns whether the daemon is now in direct mode.  Used when a spill
        is refused (disk full): with an empty spool, pushing straight to
        Redis cannot overtake anything.
        """
        self._maybe_deactivate()
        return not self.active

    def _maybe_deactivate(self) -> None:
        spool = self.spool
        if (
            self.active
            and spool is not None
            and spool.pending_records == 0
            and not self._uncommitted
            and not self._replay_inflight
            and self._redis.ready
        ):
            self.active = False
            self._metrics.spill_mode.set(0)
            self._log_mode("spool drained; pushing directly to Redis again")
            for listener in list(self._mode_listeners):
                listener()

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

    @property
    def usable(self) -> bool:
        """Can the spool take writes now (opened, not full, no recent error)?"""
        return (
            self.spool is not None
            and not self.spool.closed
            and self._max_bytes - self.spool.disk_bytes >= MIN_RECORD_BYTES
            and self._reactor.seconds() >= self._blocked_until
        )

    # -- spill + group commit ----------------------------------------------

    def spill(self, entries: List[Entry]) -> bool:
        """Append `entries` to the spool; False (nothing written) if it cannot.

        The entries stay counted in the buffer until their commit; then they
        are released and their waiters fire.
        """
        if not self.usable:
            return False
        assert self.spool is not None
        try:
            self.spool.append([encode_entry(key, item) for key, item, _ in entries])
        except SpoolFull:
            self._blocked(SpoolFull, "spool full")
            return False
        except SpoolWriteError as e:
            self._blocked(SpoolWriteError, f"spool write failed: {e}")
            return False
        self._metrics.spilled.inc(len(entries))
        self._uncommitted.append(entries)
        if self._commit_call is None:
            delay = self._commit_window if self._fsync == "batch" else 0
            self._commit_call = self._reactor.callLater(delay, self._commit)
        return True

    def _blocked(self, kind: type, message: str) -> None:
        self._metrics.spool_errors.labels(kind="full" if kind is SpoolFull else "write").inc()
        if self._reactor.seconds() >= self._blocked_until:
            self._log.error("{message}; refusing spill for {delay}s", message=message, delay=RETRY_AFTER_ERROR)
        self._blocked_until = self._reactor.seconds() + RETRY_AFTER_ERROR

    def _commit(self, inline: bool = False) -> None:
        """fsync once for everything appended since the last commit; answer them.

        The fsync runs in a thread (`run_in_thread`): the reactor keeps
        taking requests and appending them, and they form the next group.
        One sync at a time; `inline` (at stop) runs it on this thread.
        """
        self._commit_call = None
        spool = self.spool
        if spool is None or spool.closed or self._syncing is not None:
            return  # a sync in flight commits the rest when it is done
        groups, self._uncommitted = self._uncommitted, []
        plan = spool.begin_sync()
        if plan is None:
            self._answer(groups)
            return
        started = self._reactor.seconds()
        if inline:
            try:
                run_sync(plan)
            except OSError as e:
                self._synced(Failure(e), plan, groups, started)
            else:
                self._synced(None, plan, groups, started)
            return
        d = self._run_in_thread(run_sync, plan)
        self._syncing = d
        d.addBoth(self._synced, plan, groups, started)

    def _synced(self, result: Any, plan: SyncPlan, groups: List[List[Entry]], started: float) -> None:
        self._syncing = None
        spool = self.spool
        error = result.value if isinstance(result, Failure) else None
        if error is not None and not isinstance(error, OSError):
            self._log.failure("spool sync failed unexpectedly", result)
            error = OSError(str(error))
        if spool is not None and not spool.closed:
            spool.end_sync(plan, error)
        if error is not None:
            # Not known durable: do not acknowledge.  That includes what was
            # appended meanwhile (same, now distrusted, segment).  The records
            # stay in the spool; replay may still deliver them (at-least-once).
            self._blocked(SpoolWriteError, f"spool fsync failed: {error}")
            failed, self._uncommitted = groups + self._uncommitted, []
            for entries in failed:
                self._buffer.release(entries)
                for _, _, waiter in entries:
                    if waiter is not None and not waiter.deferred.called:
                        waiter.cancelled = True
                        waiter.deferred.errback(
                            NotReady("the disk spool could not fsync; not stored", retry_after=int(RETRY_AFTER_ERROR) + 1)
                        )
            return
        self._metrics.fsync_latency.observe(self._reactor.seconds() - started)
        self._answer(groups)
        if self._uncommitted and self._commit_call is None and self.running:
            delay = self._commit_window if self._fsync == "batch" else 0
            self._commit_call = self._reactor.callLater(delay, self._commit)

    def _answer(self, groups: List[List[Entry]]) -> None:
        """The records of `groups` are durable: free their memory, fire their waiters."""
        for entries in groups:
            self._buffer.release(entries)
            for _, _, waiter in entries:
                if waiter is not None:
                    waiter.stored()
        self._kick_replay()

    # -- replay ------------------------------------------------------------

    def _kick_replay(self) -> None:
        if self._replay_call is None and self.running:
            self._replay_call = self._reactor.callLater(0, self._replay)

    def _replay(self) -> None:
        """Keep up to `REPLAY_PIPELINE` batches on the wire, oldest first.

        Batches are read ahead with ``read(after=...)``; replies on the one
        connection come back in order, and each success acks its last
        record.  After a failure nothing more is acked (a later success
        cannot skip the failed records): once every batch settled, reading
        restarts from the durable cursor (those batches may repeat:
        at-least-once).
        """
        self._replay_call = None
        spool = self.spool
        if spool is None or spool.closed or self._replay_broken or not self._redis.ready:
            return  # Redis readiness and settling kick us again
        while len(self._replay_inflight) < REPLAY_PIPELINE:
            records = spool.read(REPLAY_MAX_RECORDS, REPLAY_MAX_BYTES, after=self._replay_after)
            if not records:
                if not self._replay_inflight:
                    self._maybe_deactivate()
                return
            self._replay_after = records[-1][0]
            d, counts = push_records(self._redis, records)
            self._replay_inflight.append(d)
            d.addCallbacks(self._replayed, self._replay_failed, callbackArgs=(d, records[-1][0], counts), errbackArgs=(d,))

    def _replayed(self, _: object, d: Deferred, last: Tuple[int, int, int], counts: Dict[bytes, int]) -> None:
        self._replay_inflight.remove(d)
        spool = self.spool
        if spool is None or spool.closed:
            return
        if not self._replay_broken:
            spool.ack(last)
            self._blocked_until = 0.0  # acked segments may have freed space
            for key, count in counts.items():
                # "forwarded" counts every message that reached Redis, by either path
                self._metrics.forwarded_to(key).inc(count)
                self._metrics.replayed.inc(count)
            if spool.needs_sync and self._commit_call is None:
                self._commit_call = self._reactor.callLater(self._commit_window, self._commit)
        self._replay_settled()

    def _replay_failed(self, failure: Any, d: Deferred) -> None:
        self._replay_inflight.remove(d)
        self._replay_broken = True
        self._metrics.redis_errors.labels(kind="replay").inc()
        self._replay_settled()

    def _replay_settled(self) -> None:
        if self._replay_broken:
            if self._replay_inflight:
                return  # wait for the rest before re-reading
            self._replay_broken = False
            self._replay_after = None  # from the durable cursor again
            if self.running and self._replay_call is None:
                self._replay_call = self._reactor.callLater(REPLAY_RETRY, self._replay)
        else:
            self._kick_replay()
