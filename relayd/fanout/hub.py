"""Local subscribers per stream, and the reader's position in each stream.

The hub is where one event meets many connections: each entry the reader
hands over is encoded once (`encode_event`) and the same bytes object is
written to every subscriber of its stream.  It also keeps, per stream with
local subscribers, the id of the last entry delivered (`position`): the
reader's XREAD resumes from there after a block, a re-arm or a Redis
reconnect, and a resuming subscriber goes live once its replay reached it.

A stream joins when its first subscriber arrives (the reader is woken so
the new stream is read at once; afterwards the reader reads it when the
change log names it, relayd/fanout/changes.py) and leaves with its last subscriber, so
memory is bounded by the streams actually watched here.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from relayd.fanout.events import StreamId, encode_event, envelope_ts, parse_id
from relayd.fanout.sse import Subscriber, frame
from relayd.ops.metrics import Metrics

#: Bytes of events joined into one write (one pass, one stream); a larger
#: event is a write of its own.  Twisted's transport buffer size: a fast
#: subscriber takes it in one send, a paused one queues references.
JOIN_LIMIT = 64 * 1024


class Hub:
    """Subscribers by stream; fans each entry out as one encoded event."""

    def __init__(self, clock: Any, metrics: Metrics, heartbeat_slices: int = 1) -> None:
        """`heartbeat_slices`: how many groups `broadcast` visits one at a time."""
        self._clock = clock
        self._metrics = metrics
        self._subscribers: Dict[bytes, Set[Subscriber]] = {}
        self._positions: Dict[bytes, StreamId] = {}
        self._on_new_stream: Optional[Callable[[bytes], None]] = None
        self.count = 0
        self._serial = 0  # spreads subscribers over heartbeat slices
        #: Subscribers by heartbeat slice: a tick visits one slice, not everyone.
        self._slices: List[Set[Subscriber]] = [set() for _ in range(max(1, heartbeat_slices))]
        self._sent = metrics.fanout_events_sent
        self._latency = metrics.fanout_latency

    def set_listener(self, on_new_stream: Callable[[bytes], None]) -> None:
        """`on_new_stream(stream)` runs when a stream gets its first local subscriber (reader re-arm)."""
        self._on_new_stream = on_new_stream

    def add(self, sub: Subscriber, position: StreamId) -> None:
        """Register `sub`; a new stream is read from `position` (its newest id when subscribed)."""
        subs = self._subscribers.get(sub.stream)
        self.count += 1
        self._serial += 1
        sub.serial = self._serial
        self._slices[sub.serial % len(self._slices)].add(sub)
        if subs is None:
            self._subscribers[sub.stream] = {sub}
            self._positions[sub.stream] = position
            if self._on_new_stream is not None:
                self._on_new_stream(sub.stream)
        else:
            subs.add(sub)

    def remove(self, sub: Subscriber) -> None:
        """Forget `sub` (closed or cut); a stream without subscribers is dropped."""
        subs = self._subscribers.get(sub.stream)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        self._slices[sub.serial % len(self._slices)].discard(sub)
        self.count -= 1
        if not subs:
            del self._subscribers[sub.stream]
            self._positions.pop(sub.stream, None)

    def position(self, stream: bytes) -> Optional[StreamId]:
        """Id of the last entry delivered from `stream` (None if not followed)."""
        return self._positions.get(stream)

    def positions(self) -> Dict[bytes, StreamId]:
        """Streams to read and where from (a snapshot for one XREAD)."""
        return dict(self._positions)

    def subscribers(self) -> Iterator[Subscriber]:
        """Every local subscriber."""
        for subs in list(self._subscribers.values()):
            yield from list(subs)

    def deliver(self, stream: bytes, entries: List[Any]) -> None:
        """Entries ``[id, [field, value, ...]]`` read from `stream`, in order.

        The events of one read pass go to each subscriber as one write (one
        chunk) per up to `JOIN_LIMIT` bytes: under load a pass brings
        several entries per stream, and a write per entry per subscriber
        was most of the fan-out's CPU.  The limit keeps large bodies as
        separate writes, so a paused subscriber's queue holds references to
        shared bytes, not one copy of a whole pass.
        """
        subs = self._subscribers.get(stream)
        if subs is None:
            return  # the last subscriber left while the XREAD was out
        now = self._clock.seconds()
        position = self._positions[stream]
        runs: List[List[Tuple[StreamId, bytes]]] = []
        run: List[Tuple[StreamId, bytes]] = []
        size = 0
        observe = self._latency.observe
        for entry_id, fields in entries:
            sid = parse_id(entry_id)
            if sid <= position:
                continue
            position = sid
            data = _data_field(fields)
            event = encode_event(entry_id, data)
            if run and size + len(event) > JOIN_LIMIT:
                runs.append(run)
                run, size = [], 0
            run.append((sid, event))
            size += len(event)
            ts = envelope_ts(data)
            if ts:
                observe(max(0.0, now - ts))
        if not run:
            return
        runs.append(run)
        self._positions[stream] = position
        sent = 0
        members = list(subs)
        for events in runs:
            plain = events[0][1] if len(events) == 1 else b"".join(event for _, event in events)
            framed = frame(plain)
            first, last = events[0][0], events[-1][0]
            for sub in members:
                sent += sub.events(first, last, plain, framed, events)
        if sent:
            self._sent.inc(sent)

    def replay(self, sub: Subscriber, entries: List[Any]) -> None:
        """History entries (XRANGE) for one resuming subscriber."""
        sent = 0
        for entry_id, fields in entries:
            sid = parse_id(entry_id)
            if sid > sub.cursor:
                sub.replayed(sid, encode_event(entry_id, _data_field(fields)))
                sent += 1
        if sent:
            self._sent.inc(sent)

    def broadcast(self, data: bytes, part: int = 0) -> None:
        """Write `data` (a heartbeat) to the subscribers of slice `part` not written to since the last visit.

        Heartbeats go out one slice per tick so that 10,000 subscribers
        are not 10,000 writes in one reactor turn (a latency spike for
        every event behind them).  A subscriber written to since the last
        visit needs none: it is only unmarked (`Subscriber.active`).
        """
        framed = frame(data)
        for sub in list(self._slices[part % len(self._slices)]):
            if sub.active:
                sub.active = False
            else:
                sub.send_framed(framed if sub.chunked else data)
                sub.active = False


def _data_field(fields: List[bytes]) -> bytes:
    """The ``data`` field of an entry (relayd writes exactly one field)."""
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"data":
            return fields[i + 1]
    return fields[1] if len(fields) > 1 else b""
