"""The PostgreSQL sink against a real private PostgreSQL server.

test-case-name: tests.test_counters_pg
"""

from __future__ import annotations

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.trial.unittest import TestCase

from relayd.counters.pg_sink import PostgresSink, merge_new
from relayd.counters.summary import Summary
from tests.pg_harness import PostgresServer


class MergeTests(TestCase):
    """`merge_new`: only new batches, each once, keys sorted."""

    def test_only_new_batches_once_sorted(self) -> None:
        """Old batches are left out, a batch queued twice counts once, keys come sorted."""
        a = Summary("a", 1.0, {"z": 1, "b": 2})
        b = Summary("b", 1.0, {"b": 3})
        keys, values = merge_new([a, b, a, Summary("old", 0.0, {"q": 9})], ["a", "b"])
        self.assertEqual((keys, values), (["b", "z"], [5, 1]))


class PostgresSinkTests(TestCase):
    """`PostgresSink` on a real server."""

    timeout = 120

    def setUp(self) -> None:
        self.pg = PostgresServer(self)

    def sink(self, name: str = "hits") -> PostgresSink:
        """A sink whose pool is closed at cleanup."""
        s = PostgresSink(reactor, self.pg.url, name, "counters")
        self.addCleanup(s.close)
        return s

    async def test_apply_once_and_replay_is_noop(self) -> None:
        """Tables are created; a batch applied twice (replay after a crash) counts once."""
        s = self.sink()
        batch = [Summary("b1", 1.0, {"a": 1, "b": 2}), Summary("b2", 1.0, {"a": 3})]
        self.assertEqual(await s.apply(batch), 2)
        self.assertEqual(await s.apply(batch), 0)
        self.assertEqual(await s.apply(batch + [Summary("b3", 1.0, {"c": 1})]), 1)
        self.assertEqual(self.pg.totals("hits"), {"a": 4, "b": 2, "c": 1})
        self.assertEqual(self.pg.psql("SELECT count(*) FROM counters_batches").strip(), "3")
        await s.prune()  # nothing is old enough to go
        self.assertEqual(self.pg.psql("SELECT count(*) FROM counters_batches").strip(), "3")

    async def test_large_batch_one_statement(self) -> None:
        """30,000 keys in one transaction (COPY + one upsert) land exactly; the table keeps HOT room."""
        s = self.sink()
        keys = {"key-%05d" % i: i + 1 for i in range(30_000)}
        await s.apply([Summary("big1", 1.0, keys)])
        await s.apply([Summary("big2", 1.0, keys), Summary("big1", 1.0, keys)])  # big1 replayed: skipped
        totals = self.pg.totals("hits")
        self.assertEqual(totals, {k: 2 * v for k, v in keys.items()})
        self.assertIn("fillfactor=70", self.pg.psql("SELECT reloptions FROM pg_class WHERE relname = 'counters'"))

    async def test_concurrent_writers_same_keys_no_deadlock(self) -> None:
        """Two connections upserting the same 2,000 keys in many transactions: exact sums, no deadlock."""
        first, second = self.sink(), self.sink()
        keys = ["k%04d" % i for i in range(2000)]
        await first.apply([Summary("init", 1.0, {k: 0 or 1 for k in keys})])
        rounds = []
        for r in range(10):
            rounds.append(first.apply([Summary("a%d" % r, 1.0, {k: 1 for k in keys})]))
            rounds.append(second.apply([Summary("b%d" % r, 1.0, {k: 1 for k in reversed(keys)})]))
        results = await DeferredList(rounds, consumeErrors=True)
        self.assertTrue(all(ok for ok, _ in results), [r for ok, r in results if not ok])
        totals = self.pg.totals("hits")
        self.assertEqual(set(totals.values()), {21})

    async def test_server_down_fails_then_recovers(self) -> None:
        """With the server stopped apply fails (nothing half-done); after a restart it applies once."""
        s = self.sink()
        await s.apply([Summary("b1", 1.0, {"a": 1})])
        self.pg.stop()
        with self.assertRaises(psycopg.Error):
            await s.apply([Summary("b2", 1.0, {"a": 1})])
        self.pg.start()
        for _ in range(3):  # the pool reconnects on the next use
            try:
                await s.apply([Summary("b2", 1.0, {"a": 1})])
                break
            except Exception:
                continue
        self.assertEqual(self.pg.totals("hits"), {"a": 2})
