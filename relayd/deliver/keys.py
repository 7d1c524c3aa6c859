"""The Redis keys of one deliver, all companions of its list (one Cluster slot).

A deliver named ``crm`` on list ``leads`` keeps, next to ``leads``:

- ``{leads}:processing:crm:<proc>``: the items process ``<proc>`` has claimed
  (at most `concurrency` long, so its LREMs stay cheap: saq#195);
- ``{leads}:lease:crm:<proc>``: that process's lease, refreshed while it lives;
- ``{leads}:consumers:crm``: the set of processes that may hold claims (the
  reaper reads it instead of SCAN/KEYS over the keyspace);
- ``{leads}:retry:crm``: a sorted set of items waiting to be retried, scored by due time;
- ``{leads}:rate:crm``: the global rate limiter's state.

All of them hash like ``leads`` (relayd/redis/keys.py), so every script that
touches several of them runs on one Redis Cluster node.  The dead-letter list
is a user-chosen name (default ``leads:dead``) and usually in another slot:
it is only ever written by single-key commands, in an order that can
duplicate a dead letter after a crash but never lose one.
"""

from __future__ import annotations

import attrs

from relayd.redis.keys import companion


@attrs.frozen
class DeliverKeys:
    """The key names of one deliver in one process."""

    list: bytes
    dead: bytes
    processing: bytes
    lease: bytes
    consumers: bytes
    retry: bytes
    rate: bytes

    @classmethod
    def for_deliver(cls, list_key: str, name: str, dead: str, proc_id: str) -> DeliverKeys:
        """The keys of deliver `name` on `list_key`, for process `proc_id`."""
        lk, n, p = list_key.encode(), name.encode(), proc_id.encode()
        return cls(
            list=lk,
            dead=dead.encode(),
            processing=companion(lk, b"processing", n, p),
            lease=companion(lk, b"lease", n, p),
            consumers=companion(lk, b"consumers", n),
            retry=companion(lk, b"retry", n),
            rate=companion(lk, b"rate", n),
        )

    def processing_of(self, proc: bytes) -> bytes:
        """Another process's processing list (for the reaper and the status)."""
        prefix = self.processing.rsplit(b":", 1)[0]
        return prefix + b":" + proc

    def lease_of(self, proc: bytes) -> bytes:
        """Another process's lease key."""
        prefix = self.lease.rsplit(b":", 1)[0]
        return prefix + b":" + proc
