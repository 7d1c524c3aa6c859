"""One subscriber's connection: a push producer with a bounded queue.

Memory per subscriber is bounded whatever the client does: events are
written to the transport while it takes them (sent at once when nothing is
pending, relayd/wire.py); when its buffer passes
Twisted's ``bufferSize`` the transport pauses us (``pauseProducing``) and
events queue here, as references to the bytes the hub encoded once for all
subscribers.  Past `queue_limit` queued bytes the subscriber is *cut*
(``abortConnection``: nothing more is buffered for it) and counted; it
reconnects with Last-Event-ID and loses nothing still in history.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Optional

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from relayd.fanout.events import StreamId
from relayd.wire import direct_writer


def frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk holding `data`."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@implementer(IPushProducer)
class Subscriber:
    """A live SSE response for one stream."""

    def __init__(
        self, request: Any, stream: bytes, cursor: StreamId, queue_limit: int, on_cut: Callable[[Subscriber], None]
    ) -> None:
        self.request = request
        self.stream = stream
        #: Id of the last event sent (or the start position): live events
        #: at or before it are skipped, so the resume seam has no duplicate.
        self.cursor = cursor
        #: True while replaying history (XRANGE): live events are skipped
        #: until the replay reaches the reader's position.
        self.catching_up = False
        self.closed = False
        self.serial = 0  # set by the hub: which heartbeat slice it is in
        self._paused = False
        self._queue: Deque[bytes] = deque()
        self._queued = 0
        self._limit = queue_limit
        self._on_cut = on_cut
        #: HTTP/1.1 responses without a length are chunked: the hub frames
        #: each event once (`frame`), and it is written straight to the
        #: transport (Request.write would frame it again per subscriber).
        self.chunked = bool(getattr(request, "chunked", False))
        self._transport = request.channel.transport
        #: Sends at once when the socket has nothing pending (relayd/wire.py).
        self._write = direct_writer(self._transport)
        request.registerProducer(self, True)

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for the transport."""
        return self._queued

    def event(self, sid: StreamId, data: bytes, framed: bytes) -> bool:
        """A live event from the hub (plain and chunk-framed); True if it was sent or queued."""
        if self.catching_up or sid <= self.cursor:
            return False
        self.cursor = sid
        self.send_framed(framed if self.chunked else data)
        return True

    def replayed(self, sid: StreamId, data: bytes) -> None:
        """An event from history (resume)."""
        if sid > self.cursor:
            self.cursor = sid
            self.send(data)

    def send(self, data: bytes) -> None:
        """Write `data` (unframed), or queue it while the transport is full."""
        self.send_framed(frame(data) if self.chunked else data)

    def send_framed(self, data: bytes) -> None:
        """Write bytes ready for the wire, or queue them; cut past the bound."""
        if self.closed:
            return
        if not self._paused:
            self._write(data)
            return
        self._queue.append(data)
        self._queued += len(data)
        if self._queued > self._limit:
            self.cut()

    def cut(self) -> None:
        """Disconnect a subscriber that cannot keep up."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._queued = 0
        self._on_cut(self)
        transport: Optional[Any] = getattr(self.request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def close(self) -> None:
        """End the response cleanly (relayd stopping): browsers reconnect after ``retry``."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._queued = 0
        try:
            self.request.unregisterProducer()
            self.request.finish()
        except Exception:  # noqa: BLE001 - the connection is already gone
            pass

    # IPushProducer, called by the transport

    def pauseProducing(self) -> None:
        """The transport's buffer is full: queue from now on."""
        self._paused = True

    def resumeProducing(self) -> None:
        """The transport drained: write what queued, in order."""
        self._paused = False
        queue = self._queue
        while queue and not self._paused and not self.closed:
            data = queue.popleft()
            self._queued -= len(data)
            self._write(data)

    def stopProducing(self) -> None:
        """The connection is gone."""
        self.closed = True
        self._queue.clear()
        self._queued = 0
