"""The bounded in-memory buffer between ingest and the forwarder.

Why bounded twice: `max_messages` caps per-entry overhead when messages are
tiny, `max_bytes` caps payload memory when they are large; whichever is hit
first makes `offer` refuse, and ingest answers 503 with Retry-After instead
of letting the process grow until the OOM killer acknowledges nothing.

Accounting covers messages from `offer` until `release`: entries the
forwarder has taken but Redis has not yet confirmed still count, so a Redis
that accepts the connection but never answers cannot make memory unbounded.

The queue holds *runs*: ``(target, items, waiter, size)``, one request's
messages for one target (`relayd.outbox.targets`) with their payload bytes,
so a 1000-line NDJSON request is one queue entry and one settlement, not a
thousand (before, the per-message tuples cost ~0.6 us of a message's ~3.5 us
in offer, take, settle and the forwarder's grouping).  `take` cuts a run
where a batch's bounds fall; the rest stays at the front.  A `Waiter` is
shared by all messages of one ``ack = "stored"`` request and fires when the
last of them is stored; ``ack = "accepted"`` messages carry ``None``.  A
request that gave up waiting marks its waiter cancelled: runs not yet taken
are then dropped (lazily, by `take`), so a 503 for a timed-out request
changes nothing that was not already on its way.

Settlement has one home: an entry leaves the buffer's accounting and its
waiter learns the outcome in `settle_stored` or `settle_failed`, called by
the forwarder, the one owner of delivery.  Nothing else touches waiters but
the request that created one (to cancel it).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from itertools import accumulate
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Callable, Deque, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

if TYPE_CHECKING:
    from relayd.outbox.targets import Target

# Rough per-message memory beyond the payload (tuple, bytes header, deque
# slot); counting it keeps max_bytes honest for floods of tiny messages.
ENTRY_OVERHEAD = 120

_log = Logger()

_ITEMS = itemgetter(1)
_SIZE = itemgetter(3)


class NotStored(Exception):
    """A stored-ack request's messages could not be stored (the ingest layer answers 503).

    `maybe_stored` is True when some of them may still reach Redis (an
    fsync failed after the records were written): the answer must not
    claim that nothing changed.
    """

    def __init__(self, reason: str, retry_after: int, maybe_stored: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.maybe_stored = maybe_stored


class Waiter:
    """Completion of one stored-ack request: fires once all its messages are stored.

    The outcome reaches whoever waits in one of two ways: `on_settled`, a
    plain callable (the ingest hot path: a Deferred, its callback and its
    firing cost ~1.5 us per request, ~2% of a stored POST), or `deferred`,
    made on first use (and fired at once if the outcome is already known).
    """

    __slots__ = (
        "_deferred", "count", "remaining", "taken", "cancelled", "exposed", "duplicate_of", "context",
        "on_settled", "settled",
    )  # fmt: skip

    def __init__(self, count: int) -> None:
        self._deferred: Optional[Deferred[None]] = None
        self.count = count
        self.remaining = count  # not yet stored
        self.taken = 0  # taken from the queue and not yet settled or requeued
        self.cancelled = False
        #: Some message was written to Redis or the spool, with whatever
        #: outcome: a failed (timed-out) write may still have been executed.
        self.exposed = False
        #: For an idempotent request found to repeat an earlier one: that one's id.
        self.duplicate_of: Optional[bytes] = None
        #: What the request needs to answer once settled (opaque here): its
        #: one callback reads it instead of a chain of callbacks with arguments.
        self.context: Any = None
        #: ``on_settled(waiter, error)``, called once with None (all stored)
        #: or the exception; errors it raises are logged, never propagated
        #: into the forwarder's settlement.
        self.on_settled: Optional[Callable[[Waiter, Optional[Exception]], None]] = None
        #: The outcome, once known: None until then, else (error or None,).
        self.settled: Optional[Tuple[Optional[Exception]]] = None

    @property
    def deferred(self) -> Deferred[None]:
        """A Deferred of the outcome (made on first use; Klein routes and request/reply chain on it)."""
        d = self._deferred
        if d is None:
            d = self._deferred = Deferred()
            if self.settled is not None:
                error = self.settled[0]
                if error is None:
                    d.callback(None)
                else:
                    d.errback(error)
        return d

    @property
    def answered(self) -> bool:
        """The outcome is out (or the Deferred was fired elsewhere: Klein cancels it when the client leaves)."""
        return self.settled is not None or (self._deferred is not None and self._deferred.called)

    def _settle(self, error: Optional[Exception]) -> None:
        self.settled = (error,)
        callback = self.on_settled
        if callback is not None:
            self.on_settled = None
            try:
                callback(self, error)
            except Exception:  # noqa: BLE001 - a bug in the answer must not stop the settlement of others
                _log.failure("answering a settled request failed")
        d = self._deferred
        if d is not None and not d.called:
            if error is None:
                d.callback(None)
            else:
                d.errback(error)

    @property
    def untouched(self) -> bool:
        """None of its messages was ever written anywhere: failing it changes nothing."""
        return not self.exposed

    def fail(self, error: Exception) -> None:
        """Give up: entries not yet taken are dropped; the request gets `error`."""
        self.cancelled = True
        if not self.answered:
            self._settle(error)

    def cancel(self) -> None:
        """Drop what was not taken yet, answer nothing."""
        self.cancelled = True

    def client_gone(self) -> None:
        """The client left while waiting: its messages are dropped if none
        was written anywhere yet (like a 503), else stored, telling nobody.

        Dropped means failed (`CancelledError`), not only cancelled: the
        request's one callback must still run, or ingest would count it in
        flight for ever and a graceful stop would wait out its timeout.
        """
        if self.untouched:
            self.fail(CancelledError())

    def stored(self, count: int = 1) -> None:
        """Record that `count` of its messages are stored; fire when all are.

        The Deferred may already have fired: the ack timed out, or the
        client went away and the request cancelled it.
        """
        self.remaining -= count
        if self.remaining == 0 and not self.cancelled and not self.answered:
            self._settle(None)


#: One request's messages for one target: ``(target, items, waiter, payload bytes)``.
Run = Tuple["Target", List[bytes], Optional[Waiter], int]


class RingBuffer:
    """A FIFO of runs bounded by message count and bytes."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._queue: Deque[Run] = deque()
        self._queued = 0  # messages in `_queue` (cancelled ones included until skipped)
        self.messages = 0  # queued + in flight
        self.bytes = 0  # queued + in flight, payload + ENTRY_OVERHEAD each
        self._listener: Optional[Callable[[], None]] = None

    def set_listener(self, listener: Optional[Callable[[], None]]) -> None:
        """Call `listener()` after every successful offer (the forwarder's wake-up)."""
        self._listener = listener

    @property
    def queued(self) -> int:
        """Messages waiting to be taken (cancelled ones included until skipped)."""
        return self._queued

    def has_room(self, count: int, size: int) -> bool:
        """Would an offer of `count` messages totalling `size` payload bytes fit?"""
        return (
            self.messages + count <= self.max_messages
            and self.bytes + size + count * ENTRY_OVERHEAD <= self.max_bytes
        )

    def offer(self, target: Target, items: List[bytes], waiter: Optional[Waiter]) -> bool:
        """Append all `items` for `target` as one run, or none of them; False when full.

        The buffer keeps `items` (the caller hands it over and does not change it).
        """
        count = len(items)
        payload = sum(map(len, items))
        size = payload + count * ENTRY_OVERHEAD
        if self.messages + count > self.max_messages or self.bytes + size > self.max_bytes:
            return False
        self.messages += count
        self.bytes += size
        if count:
            self._queued += count
            self._queue.append((target, items, waiter, payload))
        if self._listener is not None:
            self._listener()
        return True

    def take(self, max_messages: int, max_bytes: int) -> List[Run]:
        """Remove and return runs holding up to `max_messages` messages (at least one if any).

        A message is taken while the payload bytes taken before it are
        under `max_bytes`; a run that does not fit whole is cut there and
        its rest stays at the front.  Runs of cancelled waiters are dropped
        and un-accounted here.
        """
        queue = self._queue
        popleft = queue.popleft
        batch: List[Run] = []
        count = 0
        size = 0
        while queue and count < max_messages and size < max_bytes:
            run = popleft()
            target, items, waiter, payload = run
            k = len(items)
            if waiter is not None and waiter.cancelled:
                self._queued -= k
                self.messages -= k
                self.bytes -= payload + k * ENTRY_OVERHEAD
                continue
            # Whole when its last message goes: one message always does
            # (the loop's bounds hold before it).
            if k != 1 and (k > max_messages - count or size + payload - len(items[-1]) >= max_bytes):
                # Cut: message i goes while the bytes before it are under max_bytes.
                before = list(accumulate(map(len, items), initial=0))
                k = min(max_messages - count, bisect_left(before, max_bytes - size, 0, k))
                part = before[k]
                queue.appendleft((target, items[k:], waiter, payload - part))
                run = (target, items[:k], waiter, part)
                payload = part
            if waiter is not None:
                waiter.taken += k
            batch.append(run)
            count += k
            size += payload
        self._queued -= count
        return batch

    def _release(self, runs: List[Run]) -> None:
        count = sum(map(len, map(_ITEMS, runs)))
        self.messages -= count
        self.bytes -= sum(map(_SIZE, runs)) + count * ENTRY_OVERHEAD

    def settle_stored(self, runs: List[Run], outcomes: Optional[List[Optional[bytes]]] = None) -> None:
        """Taken runs are stored: free their share of the bounds, tell their waiters.

        `outcomes` (from an idempotent target) holds, per message of the
        runs in order, the id of the earlier copy when the message (a
        bundle) was a duplicate and was dropped.
        """
        self._release(runs)
        if outcomes is None:
            for run in runs:
                waiter = run[2]
                if waiter is not None:
                    k = len(run[1])
                    waiter.taken -= k
                    waiter.stored(k)
            return
        at = 0
        for _, items, waiter, _ in runs:
            k = len(items)
            if waiter is not None:
                waiter.taken -= k
                for first_id in outcomes[at : at + k]:
                    if first_id is not None:
                        waiter.duplicate_of = first_id
                waiter.stored(k)
            at += k

    def settle_failed(self, runs: List[Run], error: NotStored) -> None:
        """Taken runs will not be stored by us: free them, fail their waiters with `error`."""
        self._release(runs)
        for _, items, waiter, _ in runs:
            if waiter is not None:
                waiter.taken -= len(items)
                waiter.fail(error)

    def requeue(self, runs: List[Run]) -> None:
        """Put taken runs back at the front, in their order (a failed push)."""
        for _, items, waiter, _ in runs:
            self._queued += len(items)
            if waiter is not None:
                waiter.taken -= len(items)
        self._queue.extendleft(reversed(runs))
