"""The bounded in-memory buffer between ingest and the forwarder.

Why bounded twice: `max_messages` caps per-entry overhead when messages are
tiny, `max_bytes` caps payload memory when they are large; whichever is hit
first makes `offer` refuse, and ingest answers 503 with Retry-After instead
of letting the process grow until the OOM killer acknowledges nothing.

Accounting covers messages from `offer` until `release`: entries the
forwarder has taken but Redis has not yet confirmed still count, so a Redis
that accepts the connection but never answers cannot make memory unbounded.

Entries are ``(target, item, waiter)`` tuples (`relayd.outbox.targets`).  A
`Waiter` is shared by all messages of one ``ack = "stored"`` request and
fires when the last of them is stored; ``ack = "accepted"`` messages carry
``None``.  A request that gave up waiting marks its waiter cancelled:
entries not yet taken are then dropped (lazily, by `take`), so a 503 for a
timed-out request changes nothing that was not already on its way.

Settlement has one home: an entry leaves the buffer's accounting and its
waiter learns the outcome in `settle_stored` or `settle_failed`, called by
the forwarder, the one owner of delivery.  Nothing else touches waiters but
the request that created one (to cancel it).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, deque
from itertools import accumulate, islice, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

if TYPE_CHECKING:
    from relayd.outbox.targets import Target

# Rough per-message memory beyond the payload (tuple, bytes header, deque
# slot); counting it keeps max_bytes honest for floods of tiny messages.
ENTRY_OVERHEAD = 120

#: When the first this-many entries share a waiter (a stored NDJSON request,
#: up to 10,000 entries with one waiter), `take` and `settle_stored` work on
#: the whole batch with C-level helpers (islice, accumulate, Counter)
#: instead of a Python loop per entry (-30% for a 1000-line request).  Not
#: for single-message requests nor for accepted acks (no waiter): measured,
#: the helpers are dearer than the loop there.
BULK_MIN = 8

_log = Logger()

_ITEM = itemgetter(1)
_WAITER = itemgetter(2)


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


def _per_waiter(entries: List[Entry]) -> Dict[Optional[Waiter], int]:
    """How many of `entries` each waiter has (None included), in order of first entry.

    One distinct waiter (a long request) is counted by `len`; a C-level set
    finds that out cheaper than building a `Counter`.
    """
    waiters = set(map(_WAITER, entries))
    if len(waiters) == 1:
        return {waiters.pop(): len(entries)}
    return dict(Counter(map(_WAITER, entries)))


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


Entry = Tuple["Target", bytes, Optional[Waiter]]


class RingBuffer:
    """A FIFO of entries bounded by message count and bytes."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._queue: Deque[Entry] = deque()
        self.messages = 0  # queued + in flight
        self.bytes = 0  # queued + in flight, payload + ENTRY_OVERHEAD each
        self._listener: Optional[Callable[[], None]] = None

    def set_listener(self, listener: Optional[Callable[[], None]]) -> None:
        """Call `listener()` after every successful offer (the forwarder's wake-up)."""
        self._listener = listener

    @property
    def queued(self) -> int:
        """Entries waiting to be taken (cancelled ones included until skipped)."""
        return len(self._queue)

    def has_room(self, count: int, size: int) -> bool:
        """Would an offer of `count` messages totalling `size` payload bytes fit?"""
        return (
            self.messages + count <= self.max_messages
            and self.bytes + size + count * ENTRY_OVERHEAD <= self.max_bytes
        )

    def offer(self, target: Target, items: List[bytes], waiter: Optional[Waiter]) -> bool:
        """Append all `items` for `target`, or none of them; False when full."""
        count = len(items)
        size = sum(map(len, items)) + count * ENTRY_OVERHEAD
        if self.messages + count > self.max_messages or self.bytes + size > self.max_bytes:
            return False
        self.messages += count
        self.bytes += size
        queue = self._queue
        if count == 1:
            queue.append((target, items[0], waiter))
        else:
            queue.extend(zip(repeat(target), items, repeat(waiter)))
        if self._listener is not None:
            self._listener()
        return True

    def take(self, max_messages: int, max_bytes: int) -> List[Entry]:
        """Remove and return up to `max_messages` entries (at least one if any).

        Entries of cancelled waiters are dropped and un-accounted here.
        """
        queue = self._queue
        n = min(len(queue), max_messages)
        if n >= BULK_MIN and queue[0][2] is not None and queue[0][2] is queue[BULK_MIN - 1][2]:  # a long request
            bulk = self._take_bulk(n, max_bytes)
            if bulk is not None:
                return bulk
        batch: List[Entry] = []
        size = 0
        while queue and len(batch) < max_messages and size < max_bytes:
            entry = queue.popleft()
            waiter = entry[2]
            if waiter is not None:
                if waiter.cancelled:
                    self.messages -= 1
                    self.bytes -= len(entry[1]) + ENTRY_OVERHEAD
                    continue
                waiter.taken += 1
            batch.append(entry)
            size += len(entry[1])
        return batch

    def _take_bulk(self, n: int, max_bytes: int) -> Optional[List[Entry]]:
        """`take` for a long queue: what the loop would take, or None if a waiter was cancelled.

        The loop takes an entry while the bytes taken before it are under
        `max_bytes`; on the running sums that is a bisection.
        """
        queue = self._queue
        batch = list(islice(queue, n))
        waiters = _per_waiter(batch)
        for waiter in waiters:
            if waiter is not None and waiter.cancelled:
                return None  # the loop drops its entries one by one
        k = min(n, bisect_left(list(accumulate(map(len, map(_ITEM, batch)))), max_bytes) + 1)
        if k < n:
            batch = batch[:k]
            waiters = _per_waiter(batch)
        if k == len(queue):
            queue.clear()
        else:
            popleft = queue.popleft
            for _ in repeat(None, k):
                popleft()
        for waiter, count in waiters.items():
            if waiter is not None:
                waiter.taken += count
        return batch

    def _release(self, entries: List[Entry]) -> None:
        size = sum(map(len, map(_ITEM, entries)))
        self.messages -= len(entries)
        self.bytes -= size + len(entries) * ENTRY_OVERHEAD

    def settle_stored(self, entries: List[Entry], outcomes: Optional[List[Optional[bytes]]] = None) -> None:
        """Taken entries are stored: free their share of the bounds, tell their waiters.

        `outcomes` (from an idempotent target) holds, per entry, the id of
        the earlier copy when the entry was a duplicate and was dropped.
        """
        self._release(entries)
        if (
            outcomes is None
            and len(entries) >= BULK_MIN
            and entries[0][2] is not None
            and entries[0][2] is entries[BULK_MIN - 1][2]
        ):
            # Per waiter, not per entry (waiters fire in order of first entry).
            for waiter, count in _per_waiter(entries).items():
                if waiter is not None:
                    waiter.taken -= count
                    waiter.stored(count)
            return
        for i, entry in enumerate(entries):
            waiter = entry[2]
            if waiter is not None:
                waiter.taken -= 1
                if outcomes is not None and outcomes[i] is not None:
                    waiter.duplicate_of = outcomes[i]
                waiter.stored()

    def settle_failed(self, entries: List[Entry], error: NotStored) -> None:
        """Taken entries will not be stored by us: free them, fail their waiters with `error`."""
        self._release(entries)
        for entry in entries:
            waiter = entry[2]
            if waiter is not None:
                waiter.taken -= 1
                waiter.fail(error)

    def requeue(self, entries: List[Entry]) -> None:
        """Put taken entries back at the front, in their order (a failed push)."""
        for entry in entries:
            waiter = entry[2]
            if waiter is not None:
                waiter.taken -= 1
        self._queue.extendleft(reversed(entries))
