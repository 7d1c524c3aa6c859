"""The bounded in-memory buffer between ingest and the forwarder.

Why bounded twice: `max_messages` caps per-entry overhead when messages are
tiny, `max_bytes` caps payload memory when they are large; whichever is hit
first makes `offer` refuse, and ingest answers 503 with Retry-After instead
of letting the process grow until the OOM killer acknowledges nothing.

Accounting covers messages from `offer` until `release`: entries the
forwarder has taken but Redis has not yet confirmed still count, so a Redis
that accepts the connection but never answers cannot make memory unbounded.

Entries are ``(list_key, item, waiter)`` tuples.  A `Waiter` is shared by all
messages of one ``ack = "stored"`` request and fires when the last of them is
stored; ``ack = "accepted"`` messages carry ``None``.  A request that gave up
waiting marks its waiter cancelled: entries not yet taken are then dropped
(lazily, by `take`), so a 503 for a timed-out request changes nothing that
was not already on its way.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, List, Optional, Tuple

from twisted.internet.defer import Deferred

# Rough per-message memory beyond the payload (tuple, bytes header, deque
# slot); counting it keeps max_bytes honest for floods of tiny messages.
ENTRY_OVERHEAD = 120


class Waiter:
    """Completion of one stored-ack request: fires once all its messages are stored."""

    __slots__ = ("deferred", "remaining", "taken", "cancelled")

    def __init__(self, count: int) -> None:
        self.deferred: Deferred = Deferred()
        self.remaining = count
        self.taken = 0
        self.cancelled = False

    def stored(self, count: int = 1) -> None:
        """Record that `count` of its messages are stored; fire when all are.

        The Deferred may already have fired: the ack timed out, or the
        client went away and the request cancelled it.
        """
        self.remaining -= count
        if self.remaining == 0 and not self.cancelled and not self.deferred.called:
            self.deferred.callback(None)


Entry = Tuple[bytes, bytes, Optional[Waiter]]


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

    def offer(self, key: bytes, items: List[bytes], waiter: Optional[Waiter]) -> bool:
        """Append all `items` for list `key`, or none of them; False when full."""
        count = len(items)
        size = 0
        for item in items:
            size += len(item)
        size += count * ENTRY_OVERHEAD
        if self.messages + count > self.max_messages or self.bytes + size > self.max_bytes:
            return False
        self.messages += count
        self.bytes += size
        queue = self._queue
        if count == 1:
            queue.append((key, items[0], waiter))
        else:
            queue.extend([(key, item, waiter) for item in items])
        if self._listener is not None:
            self._listener()
        return True

    def take(self, max_messages: int, max_bytes: int) -> List[Entry]:
        """Remove and return up to `max_messages` entries (at least one if any).

        Entries of cancelled waiters are dropped and un-accounted here.
        """
        queue = self._queue
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

    def release(self, entries: List[Entry]) -> None:
        """Forget entries that are stored; frees their share of the bounds."""
        size = 0
        for entry in entries:
            size += len(entry[1])
        self.messages -= len(entries)
        self.bytes -= size + len(entries) * ENTRY_OVERHEAD

    def requeue(self, entries: List[Entry]) -> None:
        """Put taken entries back at the front, in their order (a failed push)."""
        for entry in entries:
            waiter = entry[2]
            if waiter is not None:
                waiter.taken -= 1
        self._queue.extendleft(reversed(entries))
