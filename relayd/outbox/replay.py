"""The one replay loop: a spool's records -> Redis, oldest first, acked after the reply.

Used for this process's own spool (the forwarder runs one) and for every
orphaned spool a process adopts (`relayd.outbox.adoption`).

Up to `REPLAY_PIPELINE` batches are on the wire at once: batches are read
ahead with ``read(after=...)`` and written by the one `RedisWriter`.
Results are taken in read order (a cluster may answer a later batch
first), and each one moves the spool's cursor (cumulative, like a Kafka
offset) up to the first record that is not in Redis yet.

One target can fail while the others are stored (one primary of a cluster
is down, or one key has the wrong type).  A *pass* reads the spool from the
durable cursor to its end:

- a target whose write failed, or whose node is not ready, is *held* for
  the rest of the pass: none of its later records is sent, so its records
  reach Redis in spool order (FIFO per list);
- the other targets keep flowing: their records are written as they are
  read, and remembered as written (`_written`: per target, the position
  through which all its records are in Redis) so that the next pass skips
  them instead of pushing them again;
- the cursor stops before the first record that is not in Redis, so the
  held records (and whatever follows them) stay on disk.

When a pass has read everything and some target is held, the next pass
starts after `REPLAY_RETRY` (doubling up to `REPLAY_MAX_RETRY` while passes
keep failing), and only once one of the held targets' nodes is ready
again, so a long outage costs no re-reading of the spool.  Records that
were written but not acked are pushed again only after a crash (the
`_written` memory is lost): at-least-once, as everywhere.

The forwarder learns from the ledger (`relayd.outbox.backlog`) when a
target's spooled records are all in Redis, and only then sends it direct
again.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.ops.metrics import Metrics
from relayd.outbox.backlog import SpoolBacklog
from relayd.outbox.targets import Target, decode_payload
from relayd.outbox.writer import RedisWriter
from relayd.spool.spool import Position, Spool

REPLAY_PIPELINE = 3  # batches on the wire: hides the round trip behind decoding the next
REPLAY_MAX_RECORDS = 1000  # one command per target per batch, like the forwarder
REPLAY_MAX_BYTES = 1024 * 1024
REPLAY_RETRY = 0.5  # seconds between passes while some target fails
REPLAY_MAX_RETRY = 5.0  # cap: a key that keeps failing (wrong type, OOM) re-reads the spool at most this often

# What became of a record when its batch was read.
_SKIP = 0  # already in Redis (an earlier pass), or undecodable: done
_HELD = 1  # its target is held in this pass: not sent
_SENT = 2  # sent in this batch: done if its target's command succeeded


class _Batch:
    """Records read together, in spool order, and their writes' outcome once known."""

    __slots__ = ("records", "groups", "deferred", "outcomes")

    def __init__(self, records: List[Tuple[Position, Optional[Target], int]], groups: Dict[Target, List[bytes]]) -> None:
        self.records = records
        self.groups = groups
        self.deferred: Optional[Deferred[Dict[Target, Optional[Failure]]]] = None
        self.outcomes: Optional[Dict[Target, Optional[Failure]]] = {} if not groups else None


class Replayer:
    """Drains one `Spool` into Redis through the writer."""

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        spool: Spool,
        writer: RedisWriter,
        metrics: Metrics,
        on_acked: Callable[[], None],
        on_idle: Optional[Callable[[], None]] = None,
        pipeline: int = REPLAY_PIPELINE,
        max_records: int = REPLAY_MAX_RECORDS,
        max_bytes: int = REPLAY_MAX_BYTES,
        backlog: Optional[SpoolBacklog] = None,
    ) -> None:
        """`on_acked()` runs after the cursor moved (make it durable);
        `on_idle()` when the spool had nothing left to read, nothing is on
        the wire and nothing is held; `backlog` (the forwarder's ledger)
        learns of each record stored."""
        self._clock = clock
        self._spool = spool
        self._writer = writer
        self._metrics = metrics
        self._on_acked = on_acked
        self._on_idle = on_idle
        self._pipeline = pipeline
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._backlog = backlog
        self._inflight: Deque[_Batch] = deque()  # read and not yet taken into account, oldest first
        self._after: Optional[Position] = None  # last record read in this pass
        self._held: Set[Target] = set()  # targets not sent for the rest of this pass
        self._broken: Set[Target] = set()  # targets with a record not in Redis, among the batches taken into account
        self._blocked = False  # a record not in Redis was met in this pass: the cursor stays before it
        self._written: Dict[Target, Position] = {}  # per target, through where its records are in Redis
        self._failed_passes = 0
        self._call: Optional[IDelayedCall] = None
        self._retry_call: Optional[IDelayedCall] = None
        self._running = False

    @property
    def busy(self) -> bool:
        """Batches on the wire."""
        return bool(self._inflight)

    @property
    def held(self) -> int:
        """Targets held back in this pass (their node is down or their writes fail)."""
        return len(self._held)

    def start(self) -> None:
        """Start replaying (now, if Redis is ready)."""
        self._running = True
        self.kick()

    def stop(self) -> Deferred[Any]:
        """Stop reading; fire once the batches on the wire settled."""
        self._running = False
        for call in (self._call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._call = self._retry_call = None
        pending = [b.deferred for b in self._inflight if b.deferred is not None and b.outcomes is None]
        return DeferredList(pending) if pending else succeed(None)

    def kick(self) -> None:
        """Replay on the next reactor turn (coalesced): new records, or Redis is back."""
        if self._call is None and self._running:
            self._call = self._clock.callLater(0, self._replay)

    # -- reading -----------------------------------------------------------

    def _replay(self) -> None:
        self._call = None
        spool = self._spool
        if spool.closed or not self._running:
            return
        if not self._writer.any_ready:
            self._wait(REPLAY_RETRY)  # no node answers: look again later (a cluster's on_ready needs all of them)
            return
        reads = 0
        while len(self._inflight) < self._pipeline:
            if reads >= self._pipeline:
                self.kick()  # held records read without a write: yield to the reactor, go on next turn
                return
            records = spool.read(self._max_records, self._max_bytes, after=self._after)
            if not records:
                if not self._inflight:
                    self._pass_done()
                return
            reads += 1
            self._after = records[-1][0]
            batch = self._prepare(records)
            self._inflight.append(batch)
            if batch.groups:
                d = self._writer.write_groups(batch.groups, source="replay")
                batch.deferred = d
                d.addCallback(self._written_batch, batch)
            else:
                self._take_results()

    def _prepare(self, records: List[Tuple[Position, bytes]]) -> _Batch:
        """Decide per record: skip (in Redis already), hold (target held) or send."""
        held = self._held
        written = self._written
        ready_for = self._writer.ready_for
        groups: Dict[Target, List[bytes]] = {}
        out: List[Tuple[Position, Optional[Target], int]] = []
        for position, payload in records:
            try:
                target, item = decode_payload(payload)
            except ValueError as e:
                # CRC-valid but not a message (written by a newer release?):
                # counted and skipped rather than blocking the spool forever.
                self._metrics.spool_corrupt.inc()
                self._log.error("spool record at {position} skipped: {error}", position=position, error=e)
                out.append((position, None, _SKIP))
                continue
            through = written.get(target)
            if through is not None and position <= through:
                out.append((position, target, _SKIP))
            elif target in held:
                out.append((position, target, _HELD))
            elif not ready_for(target):
                held.add(target)
                out.append((position, target, _HELD))
            else:
                group = groups.get(target)
                if group is None:
                    groups[target] = [item]
                else:
                    group.append(item)
                out.append((position, target, _SENT))
        return _Batch(out, groups)

    # -- results, in read order ----------------------------------------------

    def _written_batch(self, outcomes: Dict[Target, Optional[Failure]], batch: _Batch) -> None:
        batch.outcomes = outcomes
        self._take_results()
        self.kick()

    def _take_results(self) -> None:
        """Account for the oldest batches whose writes are settled; ack what is in Redis."""
        if self._spool.closed:
            self._inflight.clear()
            return
        ack: Optional[Position] = None
        while self._inflight and self._inflight[0].outcomes is not None:
            batch = self._inflight.popleft()
            position = self._account(batch)
            if position is not None:
                ack = position
        if ack is not None:
            self._spool.ack(ack)
            self._on_acked()

    def _account(self, batch: _Batch) -> Optional[Position]:
        """Take one batch's outcome into account; the position to ack through, if it moved."""
        outcomes = batch.outcomes
        assert outcomes is not None
        broken = self._broken
        for target, failure in outcomes.items():
            if failure is not None:
                broken.add(target)  # this batch's records of it are not done either
                self._held.add(target)
                self._metrics.redis_errors.labels(kind="replay").inc()
        stored: Dict[Target, int] = {}
        written = self._written
        ack: Optional[Position] = None
        for position, record_target, state in batch.records:
            if state == _SKIP or record_target is None:
                done = True
            elif state == _HELD:
                done = False
                broken.add(record_target)
            else:
                done = record_target not in broken
                if done:
                    written[record_target] = position
                    stored[record_target] = stored.get(record_target, 0) + 1
            if not done:
                self._blocked = True
            elif not self._blocked:
                ack = position
        if stored:
            self._metrics.replayed.inc(sum(stored.values()))
            backlog = self._backlog
            if backlog is not None:
                for target, count in stored.items():
                    backlog.written(target, count)
        return ack

    # -- passes ------------------------------------------------------------

    def _pass_done(self) -> None:
        """Read to the end and nothing on the wire: idle, or retry the held targets later."""
        if not self._held:
            self._failed_passes = 0
            self._written.clear()  # everything read was acked: nothing to skip next time
            self._broken.clear()
            self._blocked = False
            if self._on_idle is not None:
                self._on_idle()
            return
        self._wait(min(REPLAY_RETRY * 2 ** min(self._failed_passes, 16), REPLAY_MAX_RETRY))

    def _wait(self, delay: float) -> None:
        if self._retry_call is None and self._running:
            self._retry_call = self._clock.callLater(delay, self._retry)

    def _retry(self) -> None:
        """Start a new pass from the durable cursor once a held target can be written."""
        self._retry_call = None
        if not self._running or self._spool.closed:
            return
        if self._inflight:
            return  # the last result kicks the loop; a pass that ends with held targets waits again
        if self._held:
            ready_for = self._writer.ready_for
            if not any(ready_for(t) for t in self._held):
                self._wait(REPLAY_RETRY)  # their nodes are still down: no need to re-read
                return
            self._failed_passes += 1
            self._after = None
            self._held = set()
            self._broken = set()
            self._blocked = False
        self.kick()
