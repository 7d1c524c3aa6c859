"""Where a message goes: its destination as a value.

A route names its destination once (`ListTarget` for ``list = "leads"``);
every message in the buffer and every spool record carries it, and one
writer (`relayd.outbox.writer`) turns a batch of ``(target, payload)`` into
Redis commands.  A new kind of destination (a Redis Stream for fan-out, ...)
is one new class here with a `commands` method and a spool encoding, not a
new loop in the forwarder, the replay or the adopter.

Spool payloads: ``u32 LE (kind << 24 | header length) + header + item``.
Kind 0 is a list and its header is the list key, which makes the encoding of
a list target byte-for-byte the spool entry format of earlier releases (the
key length field with a zero top byte): spools written before targets
existed replay unchanged.
"""

from __future__ import annotations

import struct
from typing import Callable, ClassVar, Dict, List, Optional, Protocol, Sequence, Tuple

import attrs

_LEN = struct.Struct("<I")
_KIND_SHIFT = 24
MAX_HEADER_BYTES = (1 << _KIND_SHIFT) - 1  # 16 MiB: keys are short; Redis caps them at 512 MiB


class Target(Protocol):
    """A destination in Redis for a group of payloads."""

    #: Spool encoding kind (top byte of the header length); unique per class.
    KIND: ClassVar[int]

    @property
    def key(self) -> bytes:
        """The Redis key the target writes (for metrics and cluster routing)."""

    def commands(self, items: Sequence[bytes]) -> List[Tuple[bytes, ...]]:
        """Redis commands that store `items` in this target, in order."""

    def outcomes(self, replies: Sequence[object]) -> Optional[List[Optional[bytes]]]:
        """Per item, from the commands' replies: None if stored, else why not
        (the first copy's id for a duplicate); None when every item is stored."""

    def pushed(self, items: Sequence[bytes], outcomes: Optional[List[Optional[bytes]]]) -> int:
        """Messages that `items` put into Redis given `outcomes` (for metrics)."""

    def spool_header(self) -> bytes:
        """What the spool record needs to rebuild this target."""


@attrs.frozen(cache_hash=True)
class ListTarget:
    """``LPUSH key item..``: consumers take the oldest with RPOP/BRPOP/BLMOVE."""

    KIND: ClassVar[int] = 0
    key: bytes
    #: The configured name for metrics (``leads:{team}`` of a template
    #: route: one series per route, not per team); not part of equality.
    label: bytes = attrs.field(default=b"", eq=False, hash=False)

    @property
    def metric_label(self) -> bytes:
        """The configured name, else the key."""
        return self.label or self.key

    def commands(self, items: Sequence[bytes]) -> List[Tuple[bytes, ...]]:
        """One multi-value LPUSH: about one round trip whatever the count."""
        return [(b"LPUSH", self.key, *items)]

    def outcomes(self, replies: Sequence[object]) -> Optional[List[Optional[bytes]]]:
        """An LPUSH stores every item."""
        return None

    def pushed(self, items: Sequence[bytes], outcomes: Optional[List[Optional[bytes]]]) -> int:
        """Every item is one message."""
        return len(items)

    def spool_header(self) -> bytes:
        """The list key."""
        return self.key

    @classmethod
    def from_spool_header(cls, header: bytes) -> ListTarget:
        """Inverse of `spool_header`."""
        return cls(header)


from relayd.outbox.dedup import DedupListTarget  # noqa: E402 - after the Protocol it implements
from relayd.outbox.streams import ListAndStreamTarget, StreamTarget  # noqa: E402

#: kind -> constructor from a spool header.  A new target kind registers here.
_DECODERS: Dict[int, Callable[[bytes], Target]] = {
    ListTarget.KIND: ListTarget.from_spool_header,
    DedupListTarget.KIND: DedupListTarget.from_spool_header,
    StreamTarget.KIND: StreamTarget.from_spool_header,
    ListAndStreamTarget.KIND: ListAndStreamTarget.from_spool_header,
}


def encode_payload(target: Target, item: bytes) -> bytes:
    """The spool payload of one message for `target`."""
    header = target.spool_header()
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"target header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    return _LEN.pack(target.KIND << _KIND_SHIFT | len(header)) + header + item


def decode_payload(payload: bytes) -> Tuple[Target, bytes]:
    """Inverse of `encode_payload`; ``ValueError`` on a malformed payload."""
    if len(payload) < 4:
        raise ValueError("spool payload shorter than its header length field")
    (word,) = _LEN.unpack_from(payload, 0)
    kind, hlen = word >> _KIND_SHIFT, word & MAX_HEADER_BYTES
    if 4 + hlen > len(payload):
        raise ValueError("spool payload header runs past its end")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise ValueError(f"spool payload of unknown target kind {kind}")
    return decoder(payload[4 : 4 + hlen]), payload[4 + hlen :]


def group_by_target(pairs: Sequence[Tuple[Target, bytes]]) -> Dict[Target, List[bytes]]:
    """``{target: [item, ...]}`` keeping arrival order within each target."""
    groups: Dict[Target, List[bytes]] = {}
    for target, item in pairs:
        group = groups.get(target)
        if group is None:
            groups[target] = [item]
        else:
            group.append(item)
    return groups
