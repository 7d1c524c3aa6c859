"""The one replay loop: a spool's records -> Redis, oldest first, acked after the reply.

Used for this process's own spool (the forwarder runs one) and for every
orphaned spool a process adopts (`relayd.outbox.adoption`).

Up to `REPLAY_PIPELINE` batches are on the wire at once: batches are read
ahead with ``read(after=...)``, written by the one `RedisWriter`, and each
success acks its last record (cumulative, like a Kafka offset).  After a
failure nothing more is acked, since a later success cannot skip the failed
records: once every batch settled, reading restarts from the durable cursor
after `REPLAY_RETRY` (those batches may repeat: at-least-once).  Replies on
one connection come back in order, so acks advance in order.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from relayd.ops.metrics import Metrics
from relayd.outbox.targets import Target, decode_payload, encode_payload, group_by_target
from relayd.outbox.writer import RedisWriter
from relayd.spool.errors import SpoolError
from relayd.spool.spool import Position, Spool

REPLAY_PIPELINE = 3  # batches on the wire: hides the round trip behind decoding the next
REPLAY_MAX_RECORDS = 1000  # one command per target per batch, like the forwarder
REPLAY_MAX_BYTES = 1024 * 1024
REPLAY_RETRY = 0.5  # seconds between attempts while Redis fails


class Replayer:
    """Drains one `Spool` into Redis through the writer."""

    _log = Logger()

    def __init__(
        self,
        clock: Any,
        spool: Spool,
        writer: RedisWriter,
        metrics: Metrics,
        on_acked: Callable[[], None],
        on_idle: Optional[Callable[[], None]] = None,
        pipeline: int = REPLAY_PIPELINE,
        max_records: int = REPLAY_MAX_RECORDS,
        max_bytes: int = REPLAY_MAX_BYTES,
    ) -> None:
        """`on_acked()` runs after the cursor moved (make it durable);
        `on_idle()` when the spool had nothing left to read and nothing is
        on the wire."""
        self._clock = clock
        self._spool = spool
        self._writer = writer
        self._metrics = metrics
        self._on_acked = on_acked
        self._on_idle = on_idle
        self._pipeline = pipeline
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._inflight: List[Deferred] = []  # batches on the wire, oldest first
        self._after: Optional[Position] = None  # last record read ahead
        self._broken = False  # a batch failed: ack nothing until all settled
        self._call: Any = None
        self._running = False

    @property
    def busy(self) -> bool:
        """Batches on the wire."""
        return bool(self._inflight)

    def start(self) -> None:
        """Start replaying (now, if Redis is ready)."""
        self._running = True
        self.kick()

    def stop(self) -> Deferred:
        """Stop reading; fire once the batches on the wire settled."""
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return DeferredList(list(self._inflight)) if self._inflight else succeed(None)

    def kick(self) -> None:
        """Replay on the next reactor turn (coalesced): new records, or Redis is back."""
        if self._call is None and self._running and not self._broken:
            self._call = self._clock.callLater(0, self._replay)

    def _replay(self) -> None:
        self._call = None
        spool = self._spool
        if spool.closed or self._broken or not self._running or not self._writer.ready:
            return  # Redis readiness and settling kick us again
        while len(self._inflight) < self._pipeline:
            records = spool.read(self._max_records, self._max_bytes, after=self._after)
            if not records:
                if not self._inflight and self._on_idle is not None:
                    self._on_idle()
                return
            last = records[-1][0]
            self._after = last
            groups = self._decode(records)
            d = self._writer.write_groups(groups, source="replay")
            self._inflight.append(d)
            d.addCallback(self._written, d, last, sum(len(v) for v in groups.values()), groups)

    def _requeue(self, failed: List[Target], groups: Dict[Target, List[bytes]]) -> bool:
        """Some targets of a batch failed, others were stored (one node of a
        cluster is down, or one key has the wrong type): append the failed
        targets' records again at the spool's end, so the batch can be acked
        and the other targets keep flowing instead of being pushed again and
        again.  The copies and the cursor become durable in the same commit,
        copies first.  Per target, order holds while the target keeps
        failing; if it recovers in the middle of a pass, newer records of it
        may overtake the re-appended ones.  False if the spool refused.
        """
        payloads = [encode_payload(t, item) for t in failed for item in groups[t]]
        try:
            self._spool.append(payloads)
        except (SpoolError, ValueError):
            return False
        self._metrics.redis_errors.labels(kind="replay_partial").inc()
        return True

    def _decode(self, records: List[Tuple[Position, bytes]]) -> Dict[Target, List[bytes]]:
        pairs: List[Tuple[Target, bytes]] = []
        for position, payload in records:
            try:
                pairs.append(decode_payload(payload))
            except ValueError as e:
                # CRC-valid but not a message (written by a newer release?):
                # counted and skipped rather than blocking the spool forever.
                self._metrics.spool_corrupt.inc()
                self._log.error("spool record at {position} skipped: {error}", position=position, error=e)
        return group_by_target(pairs)

    def _written(
        self, outcomes: Dict[Target, Any], d: Deferred, last: Position, count: int, groups: Dict[Target, List[bytes]]
    ) -> None:
        self._inflight.remove(d)
        if self._spool.closed:
            return
        failed = [t for t, f in outcomes.items() if f is not None]
        if failed and (len(failed) == len(outcomes) or self._broken or not self._requeue(failed, groups)):
            # Nothing got through (Redis down), or the rest cannot be set aside:
            # retry the whole batch from the durable cursor after a pause.
            self._broken = True
            self._metrics.redis_errors.labels(kind="replay").inc()
        elif not self._broken:
            self._spool.ack(last)
            self._metrics.replayed.inc(count - sum(len(groups[t]) for t in failed))
            self._on_acked()
        if self._broken:
            if self._inflight:
                return  # wait for the rest before re-reading
            self._broken = False
            self._after = None  # from the durable cursor again
            if self._running and self._call is None:
                self._call = self._clock.callLater(REPLAY_RETRY, self._replay)
        else:
            self.kick()
