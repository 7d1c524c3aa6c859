"""Writing to a socket now, not on the next reactor turn (SSE events, ingest responses).

Twisted's ``transport.write`` only buffers: it registers the socket for
writability (an ``epoll_ctl``), the reactor's next poll reports it, the
data is sent, and the socket is unregistered (another ``epoll_ctl``).
Three system calls and a reactor dispatch per write, and the fan-out makes
one write per subscriber per event: 20,000 a second at the seed's load.
Measured on this box (a reactor writing 250 B to 2,000 loopback
connections drained by another process): ~17.6 us of CPU per write that
way, ~7 us sending at once.  Ingest answers every request with one write
(`relayd.ingest.http_layer.IngestRequest.respond`), so it saves the same
there, once per request.

`TurnSends` holds ingest's answers to the end of the reactor turn and
then sends them this way, back to back (why: its docstring).

`direct_writer` returns a ``write(data)`` for one transport that, when the
transport holds nothing unsent, calls ``socket.send`` at once; whatever
the kernel does not take (its buffer is full, or an error) goes to
``transport.write`` as before, so order is kept and Twisted's producer
pause (`relayd.fanout.sse.Subscriber` queues while paused, bounded) and
its error handling apply unchanged.  Transports that are not plain TCP
(TLS, a test double) get ``transport.write`` itself.

This reads attributes of ``twisted.internet.tcp.Connection`` that are not
documented API (``dataBuffer``, ``offset``, ``_tempDataLen``,
``_writeDisconnected``; `TurnSends` also appends to ``_tempDataBuffer``);
`direct_writer` and `TurnSends.writer` check they exist and fall back to
``transport.write`` otherwise, and tests/test_fanout_units.py and
tests/test_wire.py check both paths against a real connection.
"""

from __future__ import annotations

from typing import Any, Callable, List

from twisted.internet import tcp

_NEEDED = ("socket", "dataBuffer", "offset", "_tempDataLen", "_writeDisconnected", "connected", "disconnecting")


def direct_writer(transport: Any) -> Callable[[bytes], None]:
    """``write(data)`` for `transport`: sent at once when nothing is pending, else buffered as usual."""
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", True):
        return transport.write  # type: ignore[no-any-return]
    if not all(hasattr(transport, name) for name in _NEEDED):
        return transport.write  # type: ignore[no-any-return]
    send = transport.socket.send
    buffered = transport.write

    def write(data: bytes) -> None:
        t = transport
        if (
            t.connected
            and not t.disconnecting
            and not t._writeDisconnected
            and not t._tempDataLen
            and t.offset == len(t.dataBuffer)
        ):
            try:
                sent = send(data)
            except OSError:  # EAGAIN (kernel buffer full) or a dead peer: Twisted's path handles both
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        buffered(data)

    return write


class TurnSends:
    """Answers written while a reactor turn reads requests, sent back to back when the turn ends.

    Why: a client that gets its answer the moment its request was handled
    goes back to sleep before the next answer comes, so every send must
    wake it (and the kernel work of that wake-up is charged to the
    sender).  A turn that reads 50 ready connections and answers each at
    once paid that 50 times: relayd with ``ack = "accepted"`` spent 62-70
    us of CPU per request against ~52 us for stored acks, whose answers
    leave together after one Redis reply (docs/benchmarks.md, "Answers at
    the end of the turn").  Holding an answer to the end of the turn delays
    it by at most the rest of that turn.

    A held answer is put in the transport's own buffer (Twisted's
    ``_tempDataBuffer``) without registering the socket for writing, so
    anything Twisted writes on that connection afterwards (the next
    pipelined request's answer through ``transport.write``, a 400 for a bad
    one) goes after it, and ``loseConnection`` sends it before closing, as
    for any buffered write.  `flush` then sends each held buffer at once;
    what the kernel does not take, or a connection closing meanwhile, goes
    to Twisted's path (``startWriting``: the reactor's next poll sends it
    or reports the error).  Not done for transports that are not plain TCP
    (TLS, test doubles), nor before `enabled` (set once the reactor calls
    `flush` at the end of every turn: `relayd.compat.lean_dispatch`):
    `writer` is then `direct_writer`'s ``write``.
    """

    def __init__(self) -> None:
        self.enabled = False
        self._held: List[Any] = []  # transports with an answer held this turn

    def writer(self, transport: Any) -> Callable[[bytes], None]:
        """``write(data)`` for `transport`: held to the turn's end when enabled, else `direct_writer`'s."""
        direct = direct_writer(transport)
        if not self.enabled or direct == transport.write or not hasattr(transport, "_tempDataBuffer"):
            return direct
        sends = self

        def write(data: bytes) -> None:
            t = transport
            if t.disconnecting or t.offset != len(t.dataBuffer) or not t.connected or t._writeDisconnected:
                t.write(data)  # behind what Twisted has pending, or dropped as Twisted drops it
                return
            if not t._tempDataLen:
                sends._held.append(t)
            t._tempDataBuffer.append(data)
            t._tempDataLen += len(data)

        return write

    def flush(self) -> None:
        """Send what this turn held (the reactor's turn-end hook)."""
        held = self._held
        if not held:
            return
        self._held = []
        for t in held:
            if not t._tempDataLen:
                continue  # sent meanwhile (the connection wrote through Twisted, and the reactor flushed it)
            if not t.connected:
                continue  # lost: Twisted dropped the connection and its buffer
            if t.disconnecting or t._writeDisconnected or t.offset != len(t.dataBuffer) or len(t._tempDataBuffer) != 1:
                t.startWriting()  # Twisted's path sends it (registering twice is harmless)
                continue
            data = t._tempDataBuffer[0]
            try:
                sent = t.socket.send(data)
            except OSError:  # EAGAIN (kernel buffer full) or a dead peer: Twisted's path handles both
                sent = 0
            if sent == len(data):
                t._tempDataBuffer.clear()
                t._tempDataLen = 0
                continue
            t._tempDataBuffer[0] = data[sent:]
            t._tempDataLen -= sent
            t.startWriting()


#: Bytes one ``send`` may carry on a connection where `lift_send_limit` was applied.
BIG_SEND_LIMIT = 4 << 20


def lift_send_limit(transport: Any, limit: int = BIG_SEND_LIMIT) -> bool:
    """Let each ``send`` of a Twisted TCP transport carry up to `limit` bytes; True if applied.

    Why (the Redis connection): Twisted sends at most ``SEND_LIMIT`` (128
    KiB) per writable event, and once less than that is left it copies the
    rest together with everything queued behind it into a new buffer.  A
    1000-message ``LPUSH`` is ~330 KB and up to four are in flight, so an
    NDJSON load sent each command over three reactor turns and copied
    megabytes per batch: relayd spent 17 % less CPU per NDJSON message with
    the limit lifted (docs/benchmarks.md, "Redis commands in one send").
    Linux takes what its socket buffer holds from a send of any size; the
    limit exists for Windows.  ``SEND_LIMIT`` is a class attribute of
    ``FileDescriptor``; set on the instance, it changes only this connection.
    """
    if not isinstance(transport, tcp.Connection) or not isinstance(getattr(transport, "SEND_LIMIT", None), int):
        return False
    transport.SEND_LIMIT = limit
    return True
