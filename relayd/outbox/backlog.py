"""Which destinations have messages in the spool that are not in Redis yet.

Why it exists: on a Redis Cluster one primary can fail while the others
answer.  The forwarder then spools only the failed node's share and keeps
pushing the rest directly (`relayd.outbox.forwarder`).  FIFO per list must
still hold: once a list has records in the spool, its newer messages must
not reach Redis ahead of them.  So a target with a backlog keeps going
through the spool until the replay (`relayd.outbox.replay`) has written all
of its records, and only then goes direct again.

The ledger is a count per target: the forwarder adds what it appends, the
replay subtracts each record once, when it is first known stored.  Records
left by a crash are not counted (their targets are unknown until read); the
forwarder treats the whole spool as one backlog then ("recovery" spill mode,
which ends only when the spool is empty), and the ledger is cleared whenever
the spool is empty, so a count can never stay wrong for longer than that
(a record lost to disk rot, say).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

if TYPE_CHECKING:
    from relayd.outbox.targets import Target


class SpoolBacklog:
    """Per target: records in the spool not yet stored in Redis (since the spool was last empty)."""

    def __init__(self) -> None:
        self._counts: Dict[Target, int] = {}

    def spooled(self, target: Target, count: int) -> None:
        """`count` records of `target` were appended to the spool."""
        self._counts[target] = self._counts.get(target, 0) + count

    def written(self, target: Target, count: int) -> None:
        """`count` spooled records of `target` are now in Redis."""
        left = self._counts.get(target)
        if left is None:
            return  # a record from before this process started: not counted
        left -= count
        if left > 0:
            self._counts[target] = left
        else:
            del self._counts[target]

    def __contains__(self, target: object) -> bool:
        """True while `target` has spooled records not yet in Redis."""
        return target in self._counts

    def __len__(self) -> int:
        """Targets with a backlog (the ``relayd_spill_targets`` gauge)."""
        return len(self._counts)

    def clear(self) -> None:
        """The spool is empty: no target has a backlog."""
        self._counts.clear()
