"""Fan-out parts with Twisted's test doubles: SSE encoding, stream ids, the subscriber's bounded queue, stream targets.

test-case-name: tests.test_fanout_units
"""

from __future__ import annotations

import unittest
from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from relayd.config import RedisConfig
from relayd.fanout.events import encode_event, envelope_ts, format_id, parse_id
from relayd.fanout.hub import JOIN_LIMIT, Hub
from relayd.fanout.sse import Subscriber
from relayd.ops.metrics import Metrics
from relayd.outbox.streams import ListAndStreamTarget, StreamTarget
from relayd.outbox.targets import decode_payload, encode_payload


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

        def one(sid: tuple, data: bytes) -> int:  # type: ignore[type-arg]
            return sub.events(sid, sid, data, data.upper(), [(sid, data)])

        self.assertEqual(one((1, 0), b"a"), 1)
        self.assertEqual(one((1, 0), b"dup"), 0)
        sub.catching_up = True
        self.assertEqual(one((2, 0), b"held off"), 0)
        sub.catching_up = False
        self.assertEqual(one((3, 0), b"c"), 1)
        self.assertEqual(request.channel.transport.value(), b"ac")

    @given(st.integers(0, 12), st.lists(st.integers(1, 3), min_size=1, max_size=8))
    def test_a_pass_is_one_write_of_exactly_the_events_after_the_cursor(self, cursor: int, gaps: list) -> None:  # type: ignore[type-arg]
        """Whatever the cursor, a subscriber gets the pass's events after it, in order, no more.

        All of them (the rule once live): one write of the joined bytes.
        """
        sub, request, _ = subscriber()
        sub.cursor = (cursor, 0)
        sids, ms = [], 0
        for gap in gaps:
            ms += gap
            sids.append((ms, 0))
        each = [(sid, b"<%d>" % sid[0]) for sid in sids]
        plain = b"".join(e for _, e in each)
        sent = sub.events(sids[0], sids[-1], plain, plain, each)
        expected = [e for sid, e in each if sid > (cursor, 0)]
        self.assertEqual(sent, len(expected))
        self.assertEqual(request.channel.transport.value(), b"".join(expected))
        if sids[0] > (cursor, 0):
            self.assertEqual(len(request.channel.transport.objects), 1)
        self.assertEqual(sub.cursor, max(sids[-1], (cursor, 0)))

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
        """The hub writes the same bytes object to every subscriber of a stream, none to others; one write per pass."""
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
        hub.deliver(b"s", [[b"6-0", [b"data", b"y"]], [b"7-0", [b"data", b"z"]]])
        self.assertEqual(ra.channel.transport.objects[1], b"id: 6-0\ndata: y\n\nid: 7-0\ndata: z\n\n")
        self.assertIs(ra.channel.transport.objects[1], rb.channel.transport.objects[1])
        self.assertEqual(len(ra.channel.transport.objects), 2)  # one write per pass
        big = b"x" * (JOIN_LIMIT // 3)  # two events per write, not three
        hub.deliver(b"s", [[b"%d-0" % i, [b"data", big]] for i in range(8, 12)])
        self.assertEqual(len(ra.channel.transport.objects), 4)  # past JOIN_LIMIT: several writes, nothing lost
        self.assertEqual(ra.channel.transport.value().count(b"data: x"), 1 + 4)
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
        """One XADD MAXLEN ~ per item, then one change-log entry; with a list, one LPUSH first."""
        target = ListAndStreamTarget(b"l", StreamTarget(b"s", 10, label=b"s:{x}"))
        self.assertEqual(
            target.commands([b"1", b"2"]),
            [
                (b"LPUSH", b"l", b"1", b"2"),
                (b"XADD", b"s", b"MAXLEN", b"~", b"10", b"*", b"data", b"1"),
                (b"XADD", b"s", b"MAXLEN", b"~", b"10", b"*", b"data", b"2"),
                (b"XADD", b"relayd:fanout:changes", b"MAXLEN", b"~", b"20000", b"*", b"s", b"s"),
            ],
        )
        self.assertEqual(target.metric_label, b"s:{x}")
        self.assertEqual(StreamTarget(b"s", 10, label=b"a"), StreamTarget(b"s", 10, label=b"b"))


class HeartbeatTests(unittest.TestCase):
    """Heartbeats reach every subscriber once per interval, a slice per tick."""

    def test_heartbeat_slices(self) -> None:
        """Idle subscribers: one ``: ping`` each per visit round (7.5 s), never all in one tick; busy ones: none.

        No subscriber is silent for more than 15 s.
        """
        from twisted.internet.testing import MemoryReactorClock

        from relayd.fanout.subscribe import HEARTBEAT_INTERVAL, HEARTBEAT_SLICES, HEARTBEAT_VISIT, Subscriptions

        tick = HEARTBEAT_VISIT / HEARTBEAT_SLICES
        clock = MemoryReactorClock()
        subs = Subscriptions(clock, RedisConfig(), SimpleNamespace(ready=True), Metrics())
        subs._heartbeat.clock = clock
        subs._heartbeat.start(tick, now=False)
        made = [subscriber() for _ in range(30)]
        busy, busy_request, _ = made[0]
        for sub, _, _ in made:
            subs.hub.add(sub, (0, 0))
        busy.send(b"e\n\n")
        clock.advance(tick)
        first = sum(1 for _, r, _ in made[1:] if r.channel.transport.value())
        self.assertLess(first, 29)
        last_event = 0.0
        for i in range(1, 2 * HEARTBEAT_SLICES):
            if i % 20 == 0:  # an event every second for the busy one
                busy.send(b"e\n\n")
                last_event = clock.seconds()
            clock.advance(tick)
        for _, request, _ in made[1:]:
            self.assertEqual(request.channel.transport.value(), b": ping\n\n: ping\n\n")
        self.assertNotIn(b"ping", busy_request.channel.transport.value())
        while b"ping" not in busy_request.channel.transport.value():  # the busy one goes quiet...
            clock.advance(tick)
            self.assertLess(clock.seconds() - last_event, HEARTBEAT_INTERVAL + 1)
        self.assertLessEqual(clock.seconds() - last_event, HEARTBEAT_INTERVAL + 2 * tick)
        subs._heartbeat.stop()
