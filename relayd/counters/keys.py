"""The Redis keys of one counter, each in the slot it must share.

Two slots are involved, and on a Redis Cluster they are usually different:

- the **list's slot** (`relayd.redis.keys.companion` of the counter's
  ``list``): the per-process processing lists, the PostgreSQL pending lists,
  the leases and the set of processes.  Taking a batch, completing it and
  adopting a dead process's lists are single scripts over these keys.
- the **hash's slot** (companions of ``hash``): the applied-batch markers
  and the seen-message-id sets, next to the hash they guard, so the apply
  is one script.

The dead-letter list is ``<list>:dead`` (the contract's name), written with
a plain LPUSH of its own, so it need not share a slot with anything.
"""

from __future__ import annotations

import attrs

from relayd.redis.keys import companion

#: Seen-id sets are bucketed by the message's ``ts`` so a duplicate (same
#: envelope, same ts) always meets its original's bucket; a minute keeps
#: the number of sets touched per batch at one or two.
SEEN_BUCKET_SECONDS = 60


@attrs.frozen
class CounterKeys:
    """Key names for one counter (`list`, `hash`) as seen by process `proc`."""

    list: bytes
    hash: bytes
    proc: bytes

    @property
    def dead(self) -> bytes:
        """``<list>:dead``: items that cannot be counted, with the reason."""
        return self.list + b":dead"

    def processing(self, proc: bytes | None = None) -> bytes:
        """The batch a process is counting: ``{list}:counting:<proc>``."""
        return companion(self.list, b"counting", proc or self.proc)

    def batch_id(self, proc: bytes | None = None) -> bytes:
        """The id of the batch in a process's processing list (set by TAKE)."""
        return companion(self.list, b"counting", proc or self.proc, b"id")

    def pending(self, proc: bytes | None = None) -> bytes:
        """Batch summaries applied to the hash, waiting for PostgreSQL."""
        return companion(self.list, b"counting", proc or self.proc, b"pg")

    def lease(self, proc: bytes | None = None) -> bytes:
        """Who holds a process's lists: the process itself or an adopter."""
        return companion(self.list, b"counting", proc or self.proc, b"lease")

    @property
    def procs(self) -> bytes:
        """The set of process ids that have (or had) lists for this counter."""
        return companion(self.list, b"counting", b"procs")

    def marker(self, batch_id: str) -> bytes:
        """Applied-batch marker in the hash's slot (value: duplicate ids)."""
        return companion(self.hash, b"batch", batch_id.encode("ascii"))

    def seen(self, bucket: int) -> bytes:
        """Message ids counted into the hash whose ``ts`` falls in `bucket`."""
        return companion(self.hash, b"seen", b"%d" % bucket)
