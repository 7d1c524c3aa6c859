"""The counters' exactly-once core against a real ``redis-server``.

test-case-name: tests.test_counters_core

Each crash point of relayd/counters/aggregator.py is simulated by running
the protocol's steps by hand up to step k (a process killed there leaves
exactly that state in Redis) and then letting a fresh `Aggregator` (the
restarted process) run: every total must come out exact.  The harness's
synchronous RESP client is the independent witness.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from relayd.codec import encode_envelope
from relayd.config import CounterConfig, RedisConfig
from relayd.counters.aggregate import aggregate, frame
from relayd.counters.aggregator import Aggregator
from relayd.counters.redis_sink import HashSink
from relayd.counters.summary import Summary
from relayd.ops.metrics import Metrics
from relayd.redis.client import RedisClient
from tests.harness import RedisServer
from tests.test_redis_client import until


def envelope(i: int, key: str, value: Any, ts: float = 1_800_000_000.0, mid: Optional[str] = None) -> bytes:
    """An increment as the ingest path pushes it."""
    return encode_envelope(mid or "%030x" % (i + 1), ts, "/increments", "application/json", {"key": key, "value": value})


class CounterCoreTests(TestCase):
    """One counter, one real Redis, aggregators standing in for processes."""

    timeout = 60

    def setUp(self) -> Deferred:
        self.server = RedisServer(self)
        self.config = CounterConfig(name="hits", list="increments", hash="counts:hits", postgres="postgresql://x@h/db")
        self.redis = RedisClient(reactor, RedisConfig(port=self.server.port))
        self.redis.startService()
        self.addCleanup(self.redis.stopService)
        return Deferred.fromCoroutine(until(lambda: self.redis.ready, "redis client ready"))

    def aggregator(self, proc: bytes = b"p1", config: Optional[CounterConfig] = None) -> Aggregator:
        """An aggregator (not started: tests drive its steps)."""
        return Aggregator(reactor, config or self.config, self.redis, proc, Metrics().counter("hits"))

    def push(self, items: List[bytes]) -> None:
        """LPUSH items the way the outbox does (oldest first out)."""
        if items:
            self.server.command("LPUSH", "increments", *items)

    def totals(self) -> Dict[str, int]:
        """The hash, as ints."""
        flat = self.server.command("HGETALL", "counts:hits")
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def pending(self, proc: str = "p1") -> List[Summary]:
        """Summaries queued for PostgreSQL by `proc`."""
        return [Summary.decode(e) for e in self.server.command("LRANGE", "{increments}:counting:%s:pg" % proc, 0, -1)]

    def pg_totals(self, proc: str = "p1") -> Dict[str, int]:
        """What PostgreSQL would receive from the queued summaries."""
        out: Dict[str, int] = {}
        for s in self.pending(proc):
            for k, v in s.sums.items():
                out[k] = out.get(k, 0) + v
        return out

    async def test_cycle_counts_and_dead_letters(self) -> None:
        """A full cycle sums per key, dead-letters misfits with a reason, empties the processing list."""
        self.push([envelope(0, "a", 1), envelope(1, "b", 2), envelope(2, "a", 3), envelope(3, "c", "x"), b"junk"])
        self.push([encode_envelope("%030x" % 99, 1.0, "/i", "application/json", {"value": 1})])
        agg = self.aggregator()
        self.assertEqual(await agg.run_once(), 6)
        self.assertEqual(self.totals(), {"a": 4, "b": 2})
        self.assertEqual(self.pg_totals(), {"a": 4, "b": 2})
        dead = [json.loads(d) for d in self.server.command("LRANGE", "increments:dead", 0, -1)]
        reasons = sorted(d["error"]["detail"] for d in dead)
        self.assertEqual(len(reasons), 3)
        self.assertIn("not JSON", reasons)
        self.assertTrue(any("value pointer /value" in r for r in reasons))
        self.assertTrue(any("key pointer /key" in r for r in reasons))
        self.assertEqual(self.server.llen("{increments}:counting:p1"), 0)
        self.assertEqual(self.server.llen("increments"), 0)

    async def test_crash_after_take(self) -> None:
        """Killed after TAKE: the restarted process counts the batch once and takes nothing new into it."""
        self.push([envelope(i, "k%d" % (i % 3), 1) for i in range(9)])
        first = self.aggregator()
        items = await first.queue.take(self.redis, 5)
        self.assertEqual(len(items), 5)
        self.push([envelope(100 + i, "late", 1) for i in range(2)])  # arrive meanwhile
        restarted = self.aggregator()
        self.assertEqual(await restarted.count_batch(None, 100), 5)  # the unfinished batch only
        self.assertEqual(sum(self.totals().values()), 5)
        await restarted.count_batch(None, 100)
        self.assertEqual(self.totals(), {"k0": 3, "k1": 3, "k2": 3, "late": 2})
        self.assertEqual(self.pg_totals(), self.totals())

    async def test_crash_after_apply(self) -> None:
        """Killed after APPLY, before COMPLETE: the rerun finds the marker; hash and PG summary stay exact."""
        dup = envelope(1, "a", 5)
        self.push([dup])
        await self.aggregator().run_once()  # counts message 1 (a=5)
        self.push([envelope(2, "a", 1), dup, envelope(3, "b", 2)])  # message 1 pushed again by the outbox
        first = self.aggregator()
        items = await first.queue.take(self.redis, 100)
        batch = aggregate(items, self.config.key, self.config.value)
        applied = await HashSink(first.keys, 3600, 900).apply(self.redis, batch)
        self.assertTrue(applied.first)
        self.assertEqual(applied.duplicates, ("%030x" % 2,))
        self.assertEqual(self.totals(), {"a": 6, "b": 2})
        restarted = self.aggregator()
        await restarted.run_once()
        self.assertEqual(self.totals(), {"a": 6, "b": 2})
        self.assertEqual(self.pg_totals(), {"a": 6, "b": 2})
        self.assertEqual(self.server.llen("{increments}:counting:p1"), 0)

    async def test_take_returns_the_stored_batch_id(self) -> None:
        """TAKE's id is SHA-1 of the framed items; a later TAKE of the same batch returns the id stored with it (an id from an older version stays the batch's id)."""
        items = [envelope(i, "a", 1) for i in range(3)]
        self.push(items)
        agg = self.aggregator()
        framed = await agg.queue.take_framed(self.redis, 100)
        self.assertEqual((framed.id, framed.items()), (frame(list(reversed(items))).id, list(reversed(items))))
        self.server.command("SET", "{increments}:counting:p1:id", "legacy-id")  # taken by an older relayd
        again = await agg.queue.take_framed(self.redis, 100)
        self.assertEqual((again.id, again.items()), ("legacy-id", framed.items()))
        await agg.run_once()
        self.assertEqual(self.totals(), {"a": 3})
        self.assertEqual(self.server.command("EXISTS", "{counts:hits}:batch:legacy-id"), 1)
        self.assertEqual(self.server.llen("{increments}:counting:p1"), 0)

    async def test_resent_commands_are_harmless(self) -> None:
        """APPLY and COMPLETE sent twice (a retry after a lost reply) change nothing the second time."""
        self.push([envelope(i, "a", 1) for i in range(3)])
        agg = self.aggregator()
        items = await agg.queue.take(self.redis, 100)
        batch = aggregate(items, self.config.key, self.config.value)
        sink = HashSink(agg.keys, 3600, 900)
        one = await sink.apply(self.redis, batch)
        two = await sink.apply(self.redis, batch)
        self.assertEqual((one.first, two.first), (True, False))
        self.assertEqual(one.sums, two.sums)
        summary = Summary(batch.id, batch.min_ts, one.sums).encode()
        self.assertEqual(await agg.queue.complete(self.redis, batch.id, summary), 1)
        self.assertEqual(await agg.queue.complete(self.redis, batch.id, summary), 0)
        self.push([envelope(10, "b", 1)])
        await agg.queue.take(self.redis, 100)  # a newer batch in the processing list
        self.assertEqual(await agg.queue.complete(self.redis, batch.id, summary), -1)
        self.assertEqual(self.totals(), {"a": 3})
        self.assertEqual(len(self.pending()), 1)

    async def test_orphan_is_adopted(self) -> None:
        """A process gone for good (no lease) is adopted: its batch counted, its PG queue moved, it is forgotten."""
        self.push([envelope(i, "a", 1) for i in range(4)])
        dead_proc = self.aggregator(b"gone")
        await dead_proc.run_once()  # one batch counted and queued for PG
        self.push([envelope(10 + i, "b", 1) for i in range(2)])
        await dead_proc.queue.take(self.redis, 100)  # and one batch taken, then killed
        self.server.command("DEL", "{increments}:counting:gone:lease")  # its lease expired
        adopter = self.aggregator(b"p1")
        await adopter.run_once()
        self.assertEqual(self.totals(), {"a": 4, "b": 2})
        self.assertEqual(self.pg_totals("p1"), {"a": 4, "b": 2})
        self.assertEqual(self.server.command("SMEMBERS", "{increments}:counting:procs"), [b"p1"])
        self.assertEqual(self.server.llen("{increments}:counting:gone"), 0)

    async def test_live_lease_is_not_adopted(self) -> None:
        """A process whose lease is alive keeps its lists; a restarted owner takes its own lease back."""
        owner = self.aggregator(b"owner")
        self.push([envelope(1, "a", 1)])
        await owner.queue.take(self.redis, 100)
        self.assertTrue(await owner.queue.hold(self.redis, 30_000))
        await self.aggregator(b"p1").run_once()
        self.assertEqual(self.totals(), {})
        restarted_owner = self.aggregator(b"owner")
        await restarted_owner.run_once()
        self.assertEqual(self.totals(), {"a": 1})

    async def test_bad_stored_total_excludes_only_that_key(self) -> None:
        """A hash field that is not an integer: its increments are dead-lettered, the rest counted, nothing half-applied."""
        self.server.command("HSET", "counts:hits", "bad", "not-a-number")
        self.push([envelope(1, "bad", 1), envelope(2, "ok", 2)])
        agg = self.aggregator()
        await agg.run_once()
        self.assertEqual(self.totals_raw(), {b"bad": b"not-a-number", b"ok": b"2"})
        dead = [json.loads(d) for d in self.server.command("LRANGE", "increments:dead", 0, -1)]
        self.assertEqual([d["message"]["key"] for d in dead], ["bad"])
        self.assertEqual(self.pg_totals(), {"ok": 2})

    def totals_raw(self) -> Dict[bytes, bytes]:
        """The hash as raw bytes."""
        flat = self.server.command("HGETALL", "counts:hits")
        return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}

    async def test_no_postgres_queues_nothing(self) -> None:
        """Without a postgres sink no summary is queued (the hash is the only sink)."""
        agg = self.aggregator(config=attrs.evolve(self.config, postgres=None))
        self.push([envelope(1, "a", 1)])
        await agg.run_once()
        self.assertEqual(self.totals(), {"a": 1})
        self.assertEqual(self.server.llen("{increments}:counting:p1:pg"), 0)

    async def test_staleness_tracks_oldest_unapplied(self) -> None:
        """The staleness gauge is the age of the list's oldest item until a cycle applies it, then 0."""
        agg = self.aggregator()
        now = reactor.seconds()
        await agg.run_once()
        self.assertEqual(agg.staleness(), 0.0)
        self.push([envelope(1, "a", 1, ts=now - 7.0)])
        await agg._sample_list()
        self.assertGreaterEqual(agg.staleness(), 7.0)
        await agg.run_once()
        self.assertEqual(agg.staleness(), 0.0)

    async def test_backlog_is_taken_in_bounded_batches(self) -> None:
        """A list longer than batch_messages is counted in several bounded batches, each exactly once."""
        agg = self.aggregator(config=attrs.evolve(self.config, batch_messages=1000))
        self.push([envelope(i, "k%d" % (i % 50), 1) for i in range(3500)])
        sizes = []
        while True:
            n = await agg.run_once()
            if not n:
                break
            sizes.append(n)
        self.assertEqual(sizes, [1000, 1000, 1000, 500])
        self.assertEqual(self.totals(), {"k%d" % i: 70 for i in range(50)})


class CounterClusterTests(TestCase):
    """The same protocol on a real Redis Cluster, list and hash on different primaries."""

    timeout = 120

    def setUp(self) -> Deferred:
        from relayd.redis.factory import make_redis_client
        from tests.cluster_harness import RedisCluster

        self.cluster = RedisCluster(self, primaries=3, replicas=0)
        self.hash = next(h for h in ("counts:hits", "counts:a", "counts:b", "counts:c", "counts:d")
                         if self.cluster.primary_for(h).port != self.cluster.primary_for("increments").port)
        self.config = CounterConfig(name="hits", list="increments", hash=self.hash, postgres="postgresql://x@h/db")
        seeds = tuple(("127.0.0.1", n.port) for n in self.cluster.primaries())
        self.redis = make_redis_client(reactor, RedisConfig(cluster=seeds))
        self.redis.startService()
        self.addCleanup(self.redis.stopService)
        return Deferred.fromCoroutine(until(lambda: self.redis.ready, "cluster client ready"))

    async def test_counts_exactly_once_across_slots(self) -> None:
        """Every script runs in one slot; a crash after APPLY is still counted once; the queue is in the list's slot."""
        self.cluster.command_for("increments", "LPUSH", "increments", *[envelope(i, "k%d" % (i % 4), 1) for i in range(40)])
        first = Aggregator(reactor, self.config, self.redis, b"p1", None)
        items = await first.queue.take(self.redis, 25)
        batch = aggregate(items, self.config.key, self.config.value)
        await HashSink(first.keys, 3600, 900).apply(self.redis, batch)  # then "killed"
        restarted = Aggregator(reactor, self.config, self.redis, b"p1", None)
        while await restarted.run_once():
            pass
        flat = self.cluster.command_for(self.hash, "HGETALL", self.hash)
        totals = {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        self.assertEqual(totals, {"k0": 10, "k1": 10, "k2": 10, "k3": 10})
        pending = self.cluster.command_for("increments", "LRANGE", "{increments}:counting:p1:pg", 0, -1)
        pg: Dict[str, int] = {}
        for entry in pending:
            for k, v in Summary.decode(entry).sums.items():
                pg[k] = pg.get(k, 0) + v
        self.assertEqual(pg, totals)
