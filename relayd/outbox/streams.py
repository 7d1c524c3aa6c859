"""Stream destinations: `StreamTarget` (XADD) and `ListAndStreamTarget` (both).

A route with ``stream = "tracking:{team}"`` stores each message as one
Redis Stream entry, ``XADD <stream> MAXLEN ~ <history> * data <item>``:
the stream is what live subscribers read (relayd/fanout/) and what a
reconnecting subscriber resumes from (``Last-Event-ID`` is the entry id).
``MAXLEN ~`` lets Redis trim whole radix-tree nodes, so the history is "at
least `history` entries", at almost no cost per XADD.

A route with both ``list`` and ``stream`` uses `ListAndStreamTarget`: one
buffer entry, one spool record and one writer call store the message in
both keys (``LPUSH`` + ``XADD`` on one connection, in order), so a stored
ack means *both* are stored, and a failure of either retries or spills the
pair (the one that succeeded may then hold a duplicate: at-least-once, as
everywhere; consumers dedupe by envelope id).

Batching: XADD takes one entry per command, so a batch of N messages is N
commands, pipelined by the writer (all sent at once, one wait for the
last reply), followed by one entry in the fan-out change log
(`relayd.fanout.changes`: readers read only the streams named there).  MULTI/EXEC or a Lua script around them would buy nothing
here (each XADD is atomic on its own and order is kept by the connection)
and would cost a round trip or script parse; bench/fanout_bench.py
measures the plain pipeline.

`label` is the route's configured name (``tracking:{team}``), excluded
from equality: metrics are labelled by it, so a thousand teams make one
series, not a thousand.
"""

from __future__ import annotations

import struct
from typing import ClassVar, List, Optional, Sequence, Tuple

import attrs

from relayd.fanout.changes import notify_command

#: Field name of the one field of every entry (the envelope or raw body).
FIELD = b"data"

_STREAM_HEADER = struct.Struct("<Q")  # history (MAXLEN ~)
_BOTH_HEADER = struct.Struct("<QI")  # history, list key length


@attrs.frozen(cache_hash=True)
class StreamTarget:
    """``XADD key MAXLEN ~ history * data item``, one per item."""

    KIND: ClassVar[int] = 1
    key: bytes
    history: int
    label: bytes = attrs.field(default=b"", eq=False, hash=False)

    def commands(self, items: Sequence[bytes]) -> List[Tuple[bytes, ...]]:
        """One XADD per item, in order (pipelined by the writer), then the change-log entry."""
        maxlen = b"%d" % self.history
        key = self.key
        commands: List[Tuple[bytes, ...]] = [(b"XADD", key, b"MAXLEN", b"~", maxlen, b"*", FIELD, item) for item in items]
        commands.append(notify_command(key))
        return commands

    def outcomes(self, replies: Sequence[object]) -> Optional[List[Optional[bytes]]]:
        """An XADD stores its item."""
        return None

    def pushed(self, items: Sequence[bytes], outcomes: Optional[List[Optional[bytes]]]) -> int:
        """Every item is one entry."""
        return len(items)

    @property
    def metric_label(self) -> bytes:
        """The configured name (bounded cardinality), else the key."""
        return self.label or self.key

    def spool_header(self) -> bytes:
        """History and stream key."""
        return _STREAM_HEADER.pack(self.history) + self.key

    @classmethod
    def from_spool_header(cls, header: bytes) -> StreamTarget:
        """Inverse of `spool_header`."""
        if len(header) < _STREAM_HEADER.size:
            raise ValueError("stream target header too short")
        (history,) = _STREAM_HEADER.unpack_from(header, 0)
        return cls(header[_STREAM_HEADER.size :], history)


@attrs.frozen(cache_hash=True)
class ListAndStreamTarget:
    """A list and a stream together: stored means stored in both."""

    KIND: ClassVar[int] = 3
    list_key: bytes
    stream: StreamTarget

    @property
    def key(self) -> bytes:
        """The stream key (what subscribers read)."""
        return self.stream.key

    @property
    def metric_label(self) -> bytes:
        """The stream's configured name."""
        return self.stream.metric_label

    def commands(self, items: Sequence[bytes]) -> List[Tuple[bytes, ...]]:
        """One LPUSH of all items, then one XADD per item."""
        return [(b"LPUSH", self.list_key, *items), *self.stream.commands(items)]

    def outcomes(self, replies: Sequence[object]) -> Optional[List[Optional[bytes]]]:
        """Every command stores its items."""
        return None

    def pushed(self, items: Sequence[bytes], outcomes: Optional[List[Optional[bytes]]]) -> int:
        """Messages, not copies."""
        return len(items)

    def spool_header(self) -> bytes:
        """History, list key length, list key, stream key."""
        return _BOTH_HEADER.pack(self.stream.history, len(self.list_key)) + self.list_key + self.stream.key

    @classmethod
    def from_spool_header(cls, header: bytes) -> ListAndStreamTarget:
        """Inverse of `spool_header`."""
        if len(header) < _BOTH_HEADER.size:
            raise ValueError("list+stream target header too short")
        history, n = _BOTH_HEADER.unpack_from(header, 0)
        rest = header[_BOTH_HEADER.size :]
        if n > len(rest):
            raise ValueError("list+stream target header: list key runs past its end")
        return cls(rest[:n], StreamTarget(rest[n:], history))
