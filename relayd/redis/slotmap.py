"""The cluster's slot map: which primary serves each of the 16384 slots.

Built from ``CLUSTER SHARDS`` (Redis >= 7.0: per shard, its slot ranges and
its nodes with role and health) or, on older servers, ``CLUSTER SLOTS``
(per slot range, the primary first, then its replicas).  Both parsers are
pure: they take the reply as txredisapi hands it over (bulk strings as
bytes, integers as ints, status strings as str) and return slot ranges, so
the map can be rebuilt and compared without a socket.

A slot with no owner (no shard claims it, or its primary is marked failed
and no replica took over yet) maps to None: commands for it fail at once,
and `/readyz` lists it as unwritable.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from relayd.redis.keys import SLOTS
from relayd.redis.routing import Address

SlotRange = Tuple[int, int, Address]  # first slot, last slot (inclusive), primary


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _host(value: Any, default_host: str) -> str:
    """A node's announced address; empty or ``?`` means "the node that answered"."""
    host = _text(value) if value is not None else ""
    return default_host if host in ("", "?") else host


def _pairs(flat: Sequence[Any]) -> Dict[str, Any]:
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def parse_cluster_shards(reply: Sequence[Any], default_host: str) -> List[SlotRange]:
    """Slot ranges and their primary from a ``CLUSTER SHARDS`` reply.

    Per shard, the owner is its node with role master and health online; a
    shard whose primary failed (and no replica was promoted yet) owns
    nothing for now, so its slots read as unwritable until the failover.
    """
    ranges: List[SlotRange] = []
    for shard in reply:
        info = _pairs(shard)
        owner: Optional[Address] = None
        for node in info.get("nodes") or ():
            n = _pairs(node)
            if _text(n.get("role", "")) != "master" or _text(n.get("health", "online")) != "online":
                continue
            host = n.get("endpoint") if n.get("endpoint") not in (None, b"", b"?", "", "?") else n.get("ip")
            owner = (_host(host, default_host), int(n["port"]))
            break
        if owner is None:
            continue
        bounds = info.get("slots") or ()
        for i in range(0, len(bounds) - 1, 2):
            ranges.append((int(bounds[i]), int(bounds[i + 1]), owner))
    return ranges


def parse_cluster_slots(reply: Sequence[Any], default_host: str) -> List[SlotRange]:
    """Slot ranges and their primary from a ``CLUSTER SLOTS`` reply."""
    ranges: List[SlotRange] = []
    for entry in reply:
        primary = entry[2]
        ranges.append((int(entry[0]), int(entry[1]), (_host(primary[0], default_host), int(primary[1]))))
    return ranges


class SlotMap:
    """A mutable slot -> primary table (one list entry per slot: O(1) routing)."""

    def __init__(self, ranges: Sequence[SlotRange] = ()) -> None:
        self.owners: List[Optional[Address]] = [None] * SLOTS
        for first, last, address in ranges:
            if 0 <= first <= last < SLOTS:
                self.owners[first : last + 1] = [address] * (last - first + 1)

    def owner(self, slot: int) -> Optional[Address]:
        """The primary serving `slot`, or None."""
        return self.owners[slot]

    def set_owner(self, slot: int, address: Address) -> None:
        """Record a ``MOVED`` answer at once (a full refresh follows)."""
        self.owners[slot] = address

    def primaries(self) -> List[Address]:
        """The distinct primaries that own at least one slot, in slot order."""
        seen: Dict[Address, None] = {}
        for address in self.owners:
            if address is not None and address not in seen:
                seen[address] = None
        return list(seen)

    def covered(self) -> bool:
        """True when every slot has an owner."""
        return None not in self.owners

    def ranges(self) -> List[Tuple[int, int, Optional[Address]]]:
        """The map as maximal runs of one owner (None for unowned runs)."""
        out: List[Tuple[int, int, Optional[Address]]] = []
        start = 0
        owners = self.owners
        for slot in range(1, SLOTS + 1):
            if slot == SLOTS or owners[slot] != owners[start]:
                out.append((start, slot - 1, owners[start]))
                start = slot
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlotMap) and self.owners == other.owners

    __hash__ = None  # type: ignore[assignment]  # mutable
