"""The list side of a counter: batches out of the list, done, adopted.

All of it runs in the list's slot (keys.py), one script per step:

- `take`: move up to N of the oldest items from the list to this
  process's processing list, or return the batch already there (a batch is
  never changed once it may have been applied);
- `complete`: remove the batch from the processing list if it is still
  the same batch (digest fence), pushing its summary for PostgreSQL in the
  same step;
- `dead_letter`: LPUSH ``<list>:dead`` (its own command: ``<list>:dead`` is
  the contract's name and need not share the slot; a crash between it and
  `complete` can repeat a dead letter, never lose one);
- leases: a process holds ``{list}:counting:<proc>:lease`` and renews it;
  a process whose lease expired is *adopted* by another (its unfinished
  batch is counted, its PostgreSQL pending list moved over).
"""

from __future__ import annotations

from typing import Any, List, Sequence

from twisted.internet.defer import inlineCallbacks

from relayd.counters.aggregate import parse_take_reply
from relayd.counters.keys import CounterKeys
from relayd.counters.scripts import CLAIM, COMPLETE, MOVE_ALL, TAKE, TRIM_TAIL
from relayd.redis.scripts import Script

_TAKE = Script(TAKE)
_COMPLETE = Script(COMPLETE)
_MOVE_ALL = Script(MOVE_ALL)
_TRIM_TAIL = Script(TRIM_TAIL)
_CLAIM = Script(CLAIM)


class WorkQueue:
    """The list-slot operations of one counter for one process."""

    def __init__(self, keys: CounterKeys) -> None:
        self.keys = keys

    def take_framed(self, redis: Any, max_items: int, proc: bytes | None = None) -> Any:
        """Fires with the batch as a `Framed` (id, lengths, items), or None when there is nothing to count."""
        keys = [self.keys.list, self.keys.processing(proc), self.keys.batch_id(proc)]
        return _TAKE(redis, keys, [b"%d" % max_items]).addCallback(lambda reply: parse_take_reply(reply or []))

    def take(self, redis: Any, max_items: int, proc: bytes | None = None) -> Any:
        """Fires with the batch's items (``[]`` when there is nothing to count)."""
        return self.take_framed(redis, max_items, proc).addCallback(lambda f: f.items() if f is not None else [])

    def complete(self, redis: Any, batch_id: str, summary: bytes, proc: bytes | None = None) -> Any:
        """Fires with 1 (done), 0 (already done) or -1 (another batch is there)."""
        return _COMPLETE(
            redis,
            [self.keys.processing(proc), self.keys.pending(), self.keys.batch_id(proc)],
            [batch_id.encode("ascii"), summary],
        )

    def dead_letter(self, redis: Any, letters: Sequence[bytes]) -> Any:
        """LPUSH the dead letters to ``<list>:dead``."""
        return redis.execute(b"LPUSH", self.keys.dead, *letters)

    @inlineCallbacks
    def pending_tail(self, redis: Any, max_entries: int) -> Any:
        """The oldest `max_entries` PostgreSQL summaries of this process, oldest first."""
        entries = yield redis.execute(b"LRANGE", self.keys.pending(), -max_entries, -1)
        return list(reversed(entries))

    def trim_pending(self, redis: Any, count: int, digest: str) -> Any:
        """Drop the `count` oldest summaries if they are still those of `digest`."""
        return _TRIM_TAIL(redis, [self.keys.pending()], [b"%d" % count, digest.encode("ascii")])

    def pending_length(self, redis: Any) -> Any:
        """Summaries waiting for PostgreSQL in this process's list."""
        return redis.execute(b"LLEN", self.keys.pending())

    # -- leases and adoption -------------------------------------------------

    @inlineCallbacks
    def hold(self, redis: Any, ttl_ms: int) -> Any:
        """Take or renew this process's own lease; register it. Fires with True if held."""
        held = yield _CLAIM(redis, [self.keys.lease()], [self.keys.proc, b"%d" % ttl_ms])
        if held:
            yield redis.execute(b"SADD", self.keys.procs, self.keys.proc)
        return bool(held)

    @inlineCallbacks
    def orphans(self, redis: Any) -> Any:
        """Process ids registered for this counter whose lease has expired."""
        procs: List[bytes] = yield redis.execute(b"SMEMBERS", self.keys.procs)
        out = []
        for p in procs:
            if p == self.keys.proc:
                continue
            exists = yield redis.execute(b"EXISTS", self.keys.lease(p))
            if not int(exists):
                out.append(p)
        return out

    def claim(self, redis: Any, proc: bytes, ttl_ms: int) -> Any:
        """Take `proc`'s lease for this process (only when it is free)."""
        return _CLAIM(redis, [self.keys.lease(proc)], [self.keys.proc, b"%d" % ttl_ms])

    def adopt_pending(self, redis: Any, proc: bytes) -> Any:
        """Move `proc`'s PostgreSQL pending summaries behind this process's own."""
        return _MOVE_ALL(redis, [self.keys.pending(proc), self.keys.pending()], [])

    @inlineCallbacks
    def release(self, redis: Any, proc: bytes) -> Any:
        """Forget an adopted process once its lists are empty."""
        yield redis.execute(b"SREM", self.keys.procs, proc)
        yield redis.execute(b"DEL", self.keys.lease(proc))
