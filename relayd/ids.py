"""Message ids: unique, and time-ordered within a process.

An id is 30 lowercase hex digits, ``MMMMMMMMMMMM NNNNNNNN SSSSSSSSSS``:
milliseconds since the epoch (48 bits), a random per-process node (32 bits)
and a per-process sequence number (40 bits).  Fixed width hex sorts
lexicographically in numeric order, so ``sorted(ids)`` is arrival order
within a process.  The clock never runs backwards in an id (the last
millisecond is kept when the wall clock steps back) and the sequence never
resets, so ids stay unique even across clock steps.  The random node makes
collisions across processes and restarts negligible (2**-32 per pair of
processes that share a millisecond and sequence number).
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional

_SEQ_MASK = (1 << 40) - 1


class IdGenerator:
    """Generates message ids from an injected clock (`seconds()` callable)."""

    def __init__(self, seconds: Callable[[], float], node: Optional[int] = None) -> None:
        self._seconds = seconds
        if node is None:
            node = int.from_bytes(os.urandom(4), "big")
        self._node = "%08x" % (node & 0xFFFFFFFF)
        self._last_ms = 0
        self._seq = 0

    def next_id(self) -> str:
        """Return a new id, greater than every id this generator returned."""
        ms = int(self._seconds() * 1000)
        if ms < self._last_ms:
            ms = self._last_ms
        self._last_ms = ms
        self._seq = (self._seq + 1) & _SEQ_MASK
        return "%012x%s%010x" % (ms, self._node, self._seq)

    def next_ids(self, count: int) -> List[str]:
        """Return `count` new ids sharing one clock reading (for batches)."""
        ms = int(self._seconds() * 1000)
        if ms < self._last_ms:
            ms = self._last_ms
        self._last_ms = ms
        template = "%012x%s%%010x" % (ms, self._node)
        seq = self._seq
        if seq + count <= _SEQ_MASK:
            ids = list(map(template.__mod__, range(seq + 1, seq + count + 1)))  # C-level, no wrap
        else:
            ids = [template % ((seq + i) & _SEQ_MASK) for i in range(1, count + 1)]
        self._seq = (seq + count) & _SEQ_MASK
        return ids
