"""This process's disk spool as a service: open and recover, append, group commit.

The `Spooler` knows the disk only.  It does not know the buffer, Redis or
HTTP: the forwarder (`relayd.outbox.forwarder`) decides *when* to spill and
settles requests, the replay loop (`relayd.outbox.replay`) reads records
back out.  What the Spooler adds to the `Spool` (relayd/spool/) is:

- **can it take this write?** (`can_take`): room for the real size of the
  records under ``max_bytes``, and no write error within `RETRY_AFTER_ERROR`.
  Ingest, ``/readyz`` and the forwarder all ask this one question;
- **group commit**: `append` returns a Deferred that fires once the records
  are durable.  With ``fsync = "batch"``, records appended within
  `COMMIT_WINDOW` share one fsync; ``"always"`` syncs on the next reactor
  turn (still one fsync for everything appended in that turn); ``"never"``
  fires after the write to the page cache (survives a process crash, not a
  power loss).  A failed fsync fails its group *and* what was appended
  meanwhile (same, now distrusted, segment) with `SpoolWriteError`.

The fsync runs in a thread (`Spool.begin_sync` hands the thread its own
file descriptors; `run_sync` touches nothing else), one commit at a time:
while it runs, the reactor keeps answering, appending and replaying, and
what is appended meanwhile becomes the next group.  On the reactor thread
the 1-5 ms fsync stalled ingest: single-POST spill went from 2.7-4.7k to
5.9k req/s and its p99 from 61-413 ms to 35 ms (bench/spool_daemon.py).
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.ops.metrics import Metrics
from relayd.spool.errors import SpoolFull, SpoolWriteError
from relayd.spool.record import FRAME_OVERHEAD
from relayd.spool.segments import DEFAULT_SEGMENT_BYTES as SEGMENT_BYTES
from relayd.spool.spool import Spool
from relayd.spool.sync import SyncPlan, run_sync

COMMIT_WINDOW = 0.002  # seconds: a 2 ms window lets ~hundreds of requests share one fsync
RETRY_AFTER_ERROR = 1.0  # seconds before writing again after ENOSPC/EIO


class Spooler(Service):
    """This worker's disk spool: recovery at start, appends with group commit."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        path: str,
        max_bytes: int,
        fsync: str,
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
        self._uncommitted: List[Deferred] = []  # one per append since the last commit began
        self._commit_call: Any = None
        self._blocked_until = 0.0  # after SpoolFull / write errors
        #: The largest write refused since one at least that large was taken
        #: (framing included): /readyz asks whether *that* would fit now, so it
        #: agrees with ingest for the messages clients actually send.
        self.refused_size = 0

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        """Open (and recover) the spool.

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
            self._log.info("spool holds {count} records from before; replaying", count=self.spool.pending_records)

    def _oldest_age(self) -> float:
        oldest = self.spool.oldest_timestamp if self.spool else None
        return 0.0 if oldest is None else max(0.0, self._reactor.seconds() - oldest)

    def privilegedStartService(self) -> None:
        """Open the spool before listeners bind (twistd runs this first)."""
        super().privilegedStartService()
        if self.spool is None:
            self.open()

    def startService(self) -> None:
        """Open the spool if privilegedStartService did not."""
        if self.spool is None:
            self.open()
        super().startService()

    def stopService(self) -> Deferred:
        """Wait for a sync in flight, commit the rest inline, close.

        The forwarder and the replay are stopped first, so nothing appends
        or acks from here on.
        """
        super().stopService()
        if self._commit_call is not None and self._commit_call.active():
            self._commit_call.cancel()
        self._commit_call = None
        d = self._syncing if self._syncing is not None else succeed(None)

        def close(_: object) -> None:
            self._commit(inline=True)
            if self.spool is not None:
                left = self.spool.pending_records
                self.spool.close()
                self._log.info("spool closed with {count} records to replay at next start", count=left)

        return d.addBoth(close)

    # -- can it take writes? -------------------------------------------------

    @property
    def pending(self) -> bool:
        """Records written and not yet replayed, or appends not yet committed."""
        return bool(self._uncommitted) or (self.spool is not None and self.spool.pending_records > 0)

    def can_take(self, count: int, size: int) -> bool:
        """Would an append of `count` payloads totalling `size` bytes be taken now?

        Open, room under ``max_bytes`` for the framed records, and no write
        error in the last `RETRY_AFTER_ERROR` seconds.
        """
        spool = self.spool
        ok = (
            spool is not None
            and not spool.closed
            and spool.disk_bytes + size + count * FRAME_OVERHEAD <= self._max_bytes
            and self._reactor.seconds() >= self._blocked_until
        )
        if not ok:
            self.refused_size = max(self.refused_size, size + count * FRAME_OVERHEAD)
        elif size + count * FRAME_OVERHEAD >= self.refused_size:
            self.refused_size = 0
        return ok

    @property
    def refusing_until(self) -> float:
        """Time before which appends are refused after a write error (0 when none)."""
        return self._blocked_until

    # -- append + group commit -----------------------------------------------

    def append(self, payloads: List[bytes]) -> Deferred:
        """Write `payloads` (all or nothing); a Deferred that fires once they are durable.

        Raises `SpoolFull` or `SpoolWriteError` at once when nothing was
        written (the caller keeps the messages); the Deferred fails with
        `SpoolWriteError` when the fsync failed (the records are on disk
        but not known durable: they may still be replayed).
        """
        spool = self.spool
        if spool is None or spool.closed or self._reactor.seconds() < self._blocked_until:
            raise SpoolWriteError("spool not writable now")
        try:
            spool.append(payloads)
        except SpoolFull:
            # No refusal window: can_take sees the real room, so a full
            # spool takes writes again as soon as replay frees a segment.
            self._metrics.spool_errors.labels(kind="full").inc()
            raise
        except SpoolWriteError as e:
            self._refuse("write", f"spool write failed: {e}")
            raise
        self._metrics.spilled.inc(len(payloads))
        d: Deferred = Deferred()
        self._uncommitted.append(d)
        self.schedule_commit()
        return d

    def schedule_commit(self) -> None:
        """Commit (fsync) soon: after the window for ``batch``, next turn otherwise.

        The replay calls this after acks so the read cursor becomes durable.
        """
        if self._commit_call is None and self._syncing is None and self.running:
            delay = self._commit_window if self._fsync == "batch" else 0
            self._commit_call = self._reactor.callLater(delay, self._commit)

    def _refuse(self, kind: str, message: str) -> None:
        self._metrics.spool_errors.labels(kind=kind).inc()
        if self._reactor.seconds() >= self._blocked_until:
            self._log.error("{message}; refusing spill for {delay}s", message=message, delay=RETRY_AFTER_ERROR)
        self._blocked_until = self._reactor.seconds() + RETRY_AFTER_ERROR

    def acked(self) -> None:
        """Records were acknowledged (replayed): make the cursor durable; freed
        segments may have made room, so end a refusal window early."""
        self._blocked_until = 0.0
        self.schedule_commit()

    def _commit(self, inline: bool = False) -> None:
        """fsync once for everything appended since the last commit; fire their Deferreds.

        One sync at a time; `inline` (at stop) runs it on this thread.
        """
        self._commit_call = None
        spool = self.spool
        if spool is None or spool.closed or self._syncing is not None:
            return  # a sync in flight commits the rest when it is done
        group, self._uncommitted = self._uncommitted, []
        plan = spool.begin_sync()
        if plan is None:
            _fire(group)
            return
        started = self._reactor.seconds()
        if inline:
            try:
                run_sync(plan)
            except OSError as e:
                self._synced(Failure(e), plan, group, started)
            else:
                self._synced(None, plan, group, started)
            return
        d = self._run_in_thread(run_sync, plan)
        self._syncing = d
        d.addBoth(self._synced, plan, group, started)

    def _synced(self, result: Any, plan: SyncPlan, group: List[Deferred], started: float) -> None:
        self._syncing = None
        spool = self.spool
        error = result.value if isinstance(result, Failure) else None
        if error is not None and not isinstance(error, OSError):
            self._log.failure("spool sync failed unexpectedly", result)
            error = OSError(str(error))
        if spool is not None and not spool.closed:
            spool.end_sync(plan, error)
        if error is not None:
            # Not known durable: acknowledge nothing, including what was
            # appended meanwhile (same, now distrusted, segment).
            self._refuse("write", f"spool fsync failed: {error}")
            failed, self._uncommitted = group + self._uncommitted, []
            for d in failed:
                d.errback(SpoolWriteError(f"fsync failed: {error}"))
            return
        self._metrics.fsync_latency.observe(self._reactor.seconds() - started)
        _fire(group)
        if (self._uncommitted or (spool is not None and spool.needs_sync)) and self.running:
            self.schedule_commit()


def _fire(group: List[Deferred]) -> None:
    for d in group:
        d.callback(None)
