"""Fan-out parts with Twisted's test doubles: SSE encoding, stream ids, the subscriber's bounded queue, stream targets.

test-case-name: tests.test_fanout_units
"""

from __future__ import annotations

import unittest
from types import SimpleNamespace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from relayd.fanout.events import encode_event, envelope_ts, format_id, parse_id
from relayd.fanout.hub import Hub
from relayd.fanout.sse import Subscriber
from relayd.ops.metrics import Metrics
from relayd.outbox.streams import ListAndStreamTarget, StreamTarget
from relayd.outbox.targets import decode_payload, encode_payload
from relayd.wire import direct_writer


class EventTests(unittest.TestCase):
    """The SSE wire format and stream id order."""

    @given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
    def test_id_round_trip(self, ms: int, seq: int) -> None:
        """parse_id(format_id(x)) == x for every valid id."""
        self.assertEqual(parse_id(format_id((ms, seq))), (ms, seq))

    @given(st.binary(max_size=30))
    def test_malformed_ids(self, raw: bytes) -> None:
        """Anything not <digits>-<digits> within 64 bits raises ValueError."""
        import re

        m = re.fullmatch(rb"(\d{1,20})-(\d{1,20})", raw)
        if m and int(m.group(1)) < 2**64 and int(m.group(2)) < 2**64:
            parse_id(raw)
        else:
            with self.assertRaises(ValueError):
                parse_id(raw)

    @given(st.binary(max_size=200))
    def test_event_data_lines(self, data: bytes) -> None:
        """Whatever the data, the event is one block: its data lines rebuild the data (line breaks as \\n)."""
        event = encode_event(b"1-0", data)
        self.assertTrue(event.endswith(b"\n\n"))
        body = event[:-2]
        self.assertNotIn(b"\n\n", body)
        lines = body.split(b"\n")
        self.assertEqual(lines[0], b"id: 1-0")
        rebuilt = b"\n".join(line[6:] for line in lines[1:])
        self.assertEqual(rebuilt, data.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))

    def test_envelope_ts(self) -> None:
        """The envelope's ts is read without a JSON parse; anything else is 0."""
        self.assertEqual(envelope_ts(b'{"id":"01ab","ts":1700000000.250000,"route":"/t"}'), 1700000000.25)
        self.assertEqual(envelope_ts(b"raw body"), 0.0)


class RecordingTransport(StringTransport):
    """A StringTransport that also keeps the bytes objects written (identity checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.objects: list = []  # type: ignore[type-arg]

    def write(self, data: bytes) -> None:
        self.objects.append(data)
        super().write(data)


class StreamingRequest:
    """The part of a twisted.web Request a Subscriber uses, over a StringTransport.

    Not DummyRequest: its registerProducer drives pull producers in a loop.
    """

    def __init__(self) -> None:
        self.written: list = []  # type: ignore[type-arg]
        self.producer = None
        self.channel = SimpleNamespace(transport=RecordingTransport())

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def subscriber(limit: int = 100) -> tuple:  # type: ignore[type-arg]
    """A Subscriber on a StreamingRequest; and the list of cut subscribers."""
    request = StreamingRequest()
    cut: list = []  # type: ignore[type-arg]
    return Subscriber(request, b"s", (0, 0), limit, cut.append), request, cut


class SubscriberTests(unittest.TestCase):
    """The per-connection queue: written while the transport takes it, bounded while paused."""

    def test_writes_while_not_paused_and_skips_old_ids(self) -> None:
        """Live events after the cursor are written in order; at or before it, skipped."""
        sub, request, _ = subscriber()
        self.assertTrue(sub.event((1, 0), b"a", b"A"))
        self.assertFalse(sub.event((1, 0), b"dup", b"DUP"))
        sub.catching_up = True
        self.assertFalse(sub.event((2, 0), b"held off", b"HELD OFF"))
        sub.catching_up = False
        self.assertTrue(sub.event((3, 0), b"c", b"C"))
        self.assertEqual(request.channel.transport.value(), b"ac")

    def test_paused_queue_then_resume_in_order(self) -> None:
        """While paused events queue; on resume they are written in order."""
        sub, request, cut = subscriber(limit=100)
        sub.pauseProducing()
        for i in range(5):
            sub.send(b"%d" % i)
        self.assertEqual(request.channel.transport.value(), b"")
        self.assertEqual(sub.queued_bytes, 5)
        sub.resumeProducing()
        self.assertEqual(request.channel.transport.value(), b"01234")
        self.assertEqual((sub.queued_bytes, cut), (0, []))

    def test_cut_past_the_bound(self) -> None:
        """Past the queue bound the subscriber is cut once, its queue freed, its connection aborted."""
        sub, request, cut = subscriber(limit=10)
        sub.pauseProducing()
        for _ in range(5):
            sub.send(b"xxxx")
        self.assertEqual(cut, [sub])
        self.assertEqual(sub.queued_bytes, 0)
        self.assertTrue(sub.closed)
        self.assertTrue(request.channel.transport.disconnecting)

    def test_hub_encodes_once_for_all(self) -> None:
        """The hub writes the same bytes object to every subscriber of a stream, none to others."""
        hub = Hub(Clock(), Metrics())
        (a, ra, _), (b, rb, _) = subscriber(), subscriber()
        other, ro, _ = subscriber()
        other.stream = b"other"
        hub.add(a, (0, 0))
        hub.add(b, (0, 0))
        hub.add(other, (0, 0))
        hub.deliver(b"s", [[b"5-0", [b"data", b"x"]], [b"4-0", [b"data", b"old"]]])
        self.assertEqual(ra.channel.transport.value(), b"id: 5-0\ndata: x\n\n")
        self.assertEqual(rb.channel.transport.value(), b"id: 5-0\ndata: x\n\n")
        self.assertIs(ra.channel.transport.objects[0], rb.channel.transport.objects[0])
        self.assertEqual(ro.channel.transport.value(), b"")
        self.assertEqual(hub.position(b"s"), (5, 0))
        hub.remove(a)
        hub.remove(b)
        self.assertIsNone(hub.position(b"s"))


class StreamTargetTests(unittest.TestCase):
    """Stream targets: commands and spool encoding."""

    @given(st.binary(max_size=100), st.integers(1, 2**40), st.binary(max_size=100), st.binary(max_size=500))
    def test_spool_round_trip(self, key: bytes, history: int, list_key: bytes, item: bytes) -> None:
        """Both stream kinds round-trip through spool payloads."""
        for target in (StreamTarget(key, history), ListAndStreamTarget(list_key, StreamTarget(key, history))):
            self.assertEqual(decode_payload(encode_payload(target, item)), (target, item))

    def test_commands(self) -> None:
        """One XADD MAXLEN ~ per item; with a list, one LPUSH first."""
        target = ListAndStreamTarget(b"l", StreamTarget(b"s", 10, label=b"s:{x}"))
        self.assertEqual(
            target.commands([b"1", b"2"]),
            [
                (b"LPUSH", b"l", b"1", b"2"),
                (b"XADD", b"s", b"MAXLEN", b"~", b"10", b"*", b"data", b"1"),
                (b"XADD", b"s", b"MAXLEN", b"~", b"10", b"*", b"data", b"2"),
            ],
        )
        self.assertEqual(target.metric_label, b"s:{x}")
        self.assertEqual(StreamTarget(b"s", 10, label=b"a"), StreamTarget(b"s", 10, label=b"b"))


class HeartbeatTests(unittest.TestCase):
    """Heartbeats reach every subscriber once per interval, a slice per tick."""

    def test_heartbeat_slices(self) -> None:
        """Over 15 ticks of 1 s each subscriber gets exactly one ``: ping``, never all in one tick."""
        from twisted.internet.testing import MemoryReactorClock

        from relayd.config import RedisConfig
        from relayd.fanout.subscribe import HEARTBEAT_INTERVAL, Subscriptions

        clock = MemoryReactorClock()
        subs = Subscriptions(clock, RedisConfig(), SimpleNamespace(ready=True), Metrics())
        subs._heartbeat.clock = clock
        subs._heartbeat.start(HEARTBEAT_INTERVAL / 15, now=False)
        made = [subscriber() for _ in range(30)]
        for sub, _, _ in made:
            subs.hub.add(sub, (0, 0))
        clock.advance(1.0)
        first = sum(1 for _, r, _ in made if r.channel.transport.value())
        self.assertLess(first, 30)
        for _ in range(14):
            clock.advance(1.0)
        for _, request, _ in made:
            self.assertEqual(request.channel.transport.value(), b": ping\n\n")
        subs._heartbeat.stop()


class DirectWriteTests(unittest.TestCase):
    """relayd/wire.py against a real socket: sent at once when nothing is pending, else Twisted's buffer, in order."""

    def connection(self) -> tuple:  # type: ignore[type-arg]
        """A twisted tcp.Connection over one end of a socket pair (a MemoryReactor records writers); the other end."""
        import socket

        from twisted.internet import tcp
        from twisted.internet.protocol import Protocol
        from twisted.internet.testing import MemoryReactor

        ours, peer = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)
        reactor = MemoryReactor()
        conn = tcp.Connection(ours, Protocol(), reactor)
        conn.connected = True
        return conn, peer, reactor

    def drain(self, peer: Any) -> bytes:
        """Everything the peer end can read now."""
        peer.setblocking(False)
        chunks = []
        while True:
            try:
                chunk = peer.recv(1 << 20)
            except BlockingIOError:
                return b"".join(chunks)
            chunks.append(chunk)

    def test_sent_at_once_without_registering_for_writes(self) -> None:
        """An idle connection: the bytes are in the peer's socket before any reactor turn, no writer registered."""
        conn, peer, reactor = self.connection()
        write = direct_writer(conn)
        write(b"id: 1-0\ndata: x\n\n")
        self.assertEqual(self.drain(peer), b"id: 1-0\ndata: x\n\n")
        self.assertNotIn(conn, reactor.writers)

    def test_what_the_kernel_refuses_is_buffered_and_order_kept(self) -> None:
        """Past the kernel buffer the rest goes to Twisted's buffer; later writes queue behind it, never overtake."""
        conn, peer, reactor = self.connection()
        write = direct_writer(conn)
        big = bytes(range(256)) * 8192  # 2 MiB: more than a socket pair's buffer
        write(big)
        self.assertIn(conn, reactor.writers)  # the rest waits for writability
        write(b"tail")
        received = self.drain(peer)
        while len(received) < len(big) + 4:
            conn.doWrite()  # what the reactor does when the socket is writable
            received += self.drain(peer)
        self.assertEqual(received, big + b"tail")

    def test_other_transports_use_their_own_write(self) -> None:
        """A transport that is not plain TCP (a test double, TLS) is written through its write()."""
        transport = StringTransport()
        self.assertEqual(direct_writer(transport), transport.write)
