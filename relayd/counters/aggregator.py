"""The per-process counting loop of one counter, and why it counts once.

Keys (keys.py): the counter's ``list`` L, the process's processing list
P = ``{L}:counting:<proc>``, its PostgreSQL pending list Q =
``{L}:counting:<proc>:pg`` (P, Q, L in L's slot), the ``hash`` H and its
markers M(b) = ``{H}:batch:<b>`` and seen-id sets (H's slot).

One cycle, every `flush_interval` (at once again while the list has a
backlog)::

    1. take      TAKE(L -> P, at most N)     P empty: move up to N oldest
                                              items, store their id b (SHA-1
                                              of the framed items) next to P;
                                              P non-empty: return it and b
    2. aggregate b = TAKE's id; sums          pure, deterministic (aggregate.py)
    3. apply     APPLY(H, M(b), seen)         marker first; rerun = no-op
                                              answering what the first run did
    4. dead      LPUSH <L>:dead letters       at-least-once
    5. complete  COMPLETE(P, Q, b, summary)   if P's stored id == b: LPUSH Q
                                              summary; DEL P (fenced, idempotent)
    6. (pg_flusher.py) Q -> PostgreSQL, exactly once by batch id, then trim Q

Invariant: every item that left L is, at any instant, either in P (its
batch not yet completed), or counted in H exactly once *and* (with
PostgreSQL) represented in Q or in the table exactly once, or in
``<L>:dead``.  A batch's id is the SHA-1 of its content, stored next to
P by the TAKE that filled P and returned by every later TAKE, so whoever
looks at P (this process after a restart, an adopter, a resent command)
uses the same b and computes the same sums.

Crash points (kill -9 of relayd, a lost reply, a Redis restart):

- before 1 or inside it: TAKE is one script: nothing moved, or all of it.
- after 1, before 3: P holds the batch; the next cycle's TAKE returns P
  unchanged (nothing new is added to a non-empty P), 3 applies it once.
- after 3, before 5 (the dangerous one): M(b) exists; the rerun of 3
  finds it and returns the stored duplicates/exclusions, so the summary for
  PostgreSQL is rebuilt identically and H is not touched again.
- after 4, before 5: the dead letters are pushed again (documented).
- after 5: P is empty; a resent COMPLETE finds P empty (0) or a newer batch
  whose digest differs (-1): no effect.
- a reply lost for APPLY/COMPLETE and the command resent by a retry: same
  as a rerun above.

What this relies on: Redis durability of H, M, P, Q (AOF, ``appendfsync
everysec`` can lose the last second on a power loss: then a batch may be
counted again or not at all; ``always`` closes that), and M(b) outliving
any rerun (`MARKER_TTL`, a day, against reruns that come seconds later).
A message the outbox pushed twice (at-least-once) is in two batches; the
seen-id sets subtract the second copy within ``dedupe_window``.

Liveness: a process renews ``{L}:counting:<proc>:lease``; its id is
``<host>:<worker index>``, so a restarted process takes its own lease and P
back at once.  A process gone for good is adopted after `LEASE_TTL` by any
other: its P is counted (through the same steps) and its Q moved over.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional

import ujson
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relayd.config import CounterConfig
from relayd.counters.aggregate import Dead, Framed, aggregate_framed
from relayd.counters.cycle import CycleService
from relayd.counters.keys import CounterKeys
from relayd.counters.redis_sink import HashSink
from relayd.counters.summary import Summary
from relayd.counters.work_queue import WorkQueue

#: Applied-batch markers outlive any rerun (reruns come within seconds).
MARKER_TTL = 86_400
#: A process whose lease is this old is adopted (ms).  Long enough to ride
#: out a Redis failover; a restarted process does not wait for it.
LEASE_TTL_MS = 30_000
#: Seconds between lease renewals and orphan checks.
LEASE_RENEW = 5.0
#: Back-off after a failed cycle (Redis down, a script error), seconds.
RETRY_DELAY = 1.0
#: Summaries waiting for PostgreSQL per process before the hash stops
#: taking new batches too (bounds Redis memory while PostgreSQL is down;
#: ~10k batches = hours of traffic at one batch per flush).
MAX_PENDING = 10_000


def process_id(worker_index: Optional[int]) -> bytes:
    """``<hostname>:<worker index>``: stable across restarts of the same worker."""
    return f"{socket.gethostname()}:{worker_index or 0}".encode()


class Aggregator(CycleService):
    """Counts one counter's list in this process (see the module docstring)."""

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        config: CounterConfig,
        redis: Any,
        proc: bytes,
        metrics: Any,
        on_pending: Optional[Callable[[], None]] = None,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._redis = redis
        self.keys = CounterKeys(config.list.encode("utf-8"), config.hash.encode("utf-8"), proc)
        self.queue = WorkQueue(self.keys)
        self._sink = HashSink(self.keys, MARKER_TTL, int(config.dedupe_window))
        self._metrics = metrics
        self._pg = config.postgres is not None
        self._on_pending = on_pending
        CycleService.__init__(self)
        self._last_lease = -LEASE_RENEW
        self._held = False
        self._failing = False
        self._pending = 0
        #: ts of the oldest item not yet applied to the hash (batch in hand, or the list's tail).
        self._batch_ts: Optional[float] = None
        self._list_ts: Optional[float] = None
        self.cycles = 0

    # -- staleness -----------------------------------------------------------

    def oldest_unapplied(self) -> Optional[float]:
        """The ts of the oldest increment known not to be in the hash yet."""
        known = [t for t in (self._batch_ts, self._list_ts) if t is not None]
        return min(known) if known else None

    def staleness(self) -> float:
        """Seconds since the oldest unapplied increment was stored (0 if none)."""
        oldest = self.oldest_unapplied()
        return max(0.0, self._reactor.seconds() - oldest) if oldest is not None else 0.0

    # -- service -------------------------------------------------------------

    async def _run(self) -> None:
        while self.running:
            started = self._reactor.seconds()
            try:
                if not self._redis.ready:
                    await self._pause(0.1)
                    continue
                taken = await self.run_once()
                if self._failing:
                    self._log.info("counter {name}: counting again", name=self._config.name)
                    self._failing = False
            except Exception as e:
                if not self._failing:
                    self._log.warn("counter {name}: cycle failed ({error}); retrying", name=self._config.name, error=e)
                    self._failing = True
                await self._pause(RETRY_DELAY)
                continue
            if taken >= self._config.batch_messages:
                continue  # a backlog: next batch at once
            await self._pause(self._config.flush_interval - (self._reactor.seconds() - started))

    # -- one cycle -----------------------------------------------------------

    async def run_once(self) -> int:
        """Lease upkeep, adoption, then one batch of this process; returns items taken."""
        now = self._reactor.seconds()
        if now - self._last_lease >= LEASE_RENEW or not self._held:
            self._held = await self.queue.hold(self._redis, LEASE_TTL_MS)
            self._last_lease = now
            if self._held:
                await self.adopt_orphans()
        if not self._held:
            return 0  # an adopter holds our lists: wait for it to finish
        if self._pg and self._pending >= MAX_PENDING:
            self._pending = int(await self.queue.pending_length(self._redis))
            if self._pending >= MAX_PENDING:
                await self._sample_list()
                return 0
        return await self.count_batch(None, self._config.batch_messages)

    async def count_batch(self, proc: Optional[bytes], max_items: int) -> int:
        """Steps 1-5 for process `proc`'s processing list (None: this process)."""
        framed: Optional[Framed] = await self.queue.take_framed(self._redis, max_items, proc)
        if framed is None:
            await self._sample_list()
            return 0
        batch = aggregate_framed(framed, self._config.key, self._config.value)
        if batch.min_ts is not None:
            self._batch_ts = batch.min_ts if self._batch_ts is None else min(self._batch_ts, batch.min_ts)
        applied = await self._sink.apply(self._redis, batch)
        dead = list(batch.dead)
        if applied.excluded:
            excluded = set(applied.excluded)
            for c in batch.counted:
                if c.key in excluded:
                    item = ujson.dumps({"id": c.id, "key": c.key, "value": c.value}).encode("utf-8")
                    dead.append(Dead(item, "the key's stored total is not an integer or could leave int64"))
        if dead:
            await self.queue.dead_letter(self._redis, [d.letter() for d in dead])
        summary = Summary(batch.id, batch.min_ts, applied.sums).encode() if self._pg and applied.sums else b""
        done = await self.queue.complete(self._redis, batch.id, summary, proc)
        self._batch_ts = None
        await self._sample_list()
        if int(done) == 1:
            if summary:
                self._pending += 1
                if self._on_pending is not None:
                    self._on_pending()
            m = self._metrics
            if m is not None:
                excluded_keys = set(applied.excluded)
                left_out = sum(1 for c in batch.counted if c.key in excluded_keys) if excluded_keys else 0
                m.applied.inc(len(batch.ids) - len(applied.duplicates) - left_out)
                m.duplicates.inc(len(applied.duplicates))
                m.dead.inc(len(dead))
                m.batches.inc()
        self.cycles += 1
        return batch.size

    async def _sample_list(self) -> None:
        """Remember the ts of the list's oldest item (the staleness gauge's other half)."""
        tail = await self._redis.execute(b"LINDEX", self.keys.list, -1)
        ts = None
        if tail is not None:
            try:
                value = ujson.loads(tail).get("ts")
                ts = float(value) if isinstance(value, (int, float)) else None
            except (ValueError, AttributeError):
                ts = None
        self._list_ts = ts

    async def adopt_orphans(self) -> None:
        """Count the unfinished batch and take over the pending list of every dead process."""
        for proc in await self.queue.orphans(self._redis):
            if not await self.queue.claim(self._redis, proc, LEASE_TTL_MS):
                continue
            self._log.info("counter {name}: adopting the lists of {proc}", name=self._config.name, proc=proc)
            await self.count_batch(proc, 0)
            if self._pg:
                moved = await self.queue.adopt_pending(self._redis, proc)
                if moved:
                    self._pending += int(moved)
                    if self._on_pending is not None:
                        self._on_pending()
            await self.queue.release(self._redis, proc)
