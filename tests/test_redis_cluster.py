"""Tests of the Redis Cluster layer: routing rules, the slot map, the start-up
probe, and `relayd.redis.cluster.ClusterClient` against a real local cluster.

test-case-name: tests.test_redis_cluster

The pure parts (`routing`, `slotmap`) get examples and properties; the
client runs on the real reactor against real ``redis-server`` nodes in
cluster mode (`tests.cluster_harness.RedisCluster`), with the harness's
synchronous RESP client as the independent witness of where data landed.
Redirects are provoked by moving a slot by hand (``CLUSTER SETSLOT``), so
the test knows exactly which reply the client saw.
"""

from __future__ import annotations

import unittest
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from relayd.config import ConfigError, RedisConfig, config_from_string
from relayd.redis.client import ConnectionError
from relayd.redis.cluster import ClusterClient
from relayd.redis.keys import SLOTS, key_slot
from relayd.redis.probe import probe_cluster
from relayd.redis.routing import Redirect, command_key, parse_redirect
from relayd.redis.slotmap import SlotMap, parse_cluster_shards, parse_cluster_slots
from tests.cluster_harness import RedisCluster, keys_on_each_primary
from tests.harness import RedisServer, RespClient, free_port
from tests.test_redis_client import until


class CommandKeyTests(unittest.TestCase):
    """`command_key` picks the key Redis Cluster routes a command by."""

    def test_first_argument_is_the_key(self) -> None:
        """LPUSH, BLMOVE, RPOP route by their first argument."""
        self.assertEqual(command_key((b"LPUSH", b"leads", b"v")), b"leads")
        self.assertEqual(command_key(("BLMOVE", "src", "dst", "RIGHT", "LEFT", 0)), b"src")

    def test_eval_routes_by_first_key_after_numkeys(self) -> None:
        """EVAL/EVALSHA: keys follow numkeys; with no keys, any node."""
        self.assertEqual(command_key((b"EVAL", b"return 1", 2, b"{a}:x", b"{a}:y", b"arg")), b"{a}:x")
        self.assertEqual(command_key((b"evalsha", b"abc", b"1", b"k")), b"k")
        self.assertIsNone(command_key((b"EVAL", b"return 1", 0)))

    def test_xread_routes_by_first_stream(self) -> None:
        """XREAD ... STREAMS s1 s2 id1 id2 routes by s1."""
        self.assertEqual(command_key((b"XREAD", b"BLOCK", 0, b"STREAMS", b"s1", b"$")), b"s1")

    def test_keyless_commands(self) -> None:
        """PING, CLUSTER ... name no key."""
        self.assertIsNone(command_key((b"PING",)))
        self.assertIsNone(command_key((b"CLUSTER", b"SHARDS")))


class RedirectTests(unittest.TestCase):
    """`parse_redirect` reads MOVED/ASK errors and nothing else."""

    def test_moved_and_ask(self) -> None:
        """Slot and address; an empty host means the node that answered."""
        self.assertEqual(parse_redirect("MOVED 3999 127.0.0.1:6381", "h"), Redirect("MOVED", 3999, ("127.0.0.1", 6381)))
        self.assertEqual(parse_redirect(b"ASK 1 :7000", "10.0.0.5"), Redirect("ASK", 1, ("10.0.0.5", 7000)))
        self.assertEqual(parse_redirect("MOVED 7 [::1]:7000", "h"), Redirect("MOVED", 7, ("::1", 7000)))

    def test_other_errors(self) -> None:
        """Other errors are not redirects."""
        for text in ("CLUSTERDOWN The cluster is down", "WRONGTYPE x", "MOVED x y", "ASK 1 nohost"):
            self.assertIsNone(parse_redirect(text, "h"), text)


# What CLUSTER SHARDS / CLUSTER SLOTS look like through txredisapi
# (bulk strings as bytes, integers as ints), trimmed to the fields used.
SHARDS_REPLY = [
    [b"slots", [0, 5460], b"nodes", [
        [b"id", b"a", b"port", 7000, b"ip", b"127.0.0.1", b"endpoint", b"127.0.0.1", b"role", b"master", b"health", b"online"],
        [b"id", b"d", b"port", 7003, b"ip", b"127.0.0.1", b"endpoint", b"127.0.0.1", b"role", b"replica", b"health", b"online"],
    ]],
    [b"slots", [5461, 10922], b"nodes", [
        [b"id", b"b", b"port", 7001, b"ip", b"127.0.0.1", b"endpoint", b"?", b"role", b"master", b"health", b"failed"],
        [b"id", b"e", b"port", 7004, b"ip", b"", b"endpoint", b"", b"role", b"master", b"health", b"online"],
    ]],
    [b"slots", [10923, 11000, 11001, 16383], b"nodes", [
        [b"id", b"c", b"port", 7002, b"ip", b"127.0.0.1", b"endpoint", b"127.0.0.1", b"role", b"master", b"health", b"failed"],
    ]],
]  # fmt: skip
SLOTS_REPLY = [
    [0, 5460, [b"127.0.0.1", 7000, b"a"], [b"127.0.0.1", 7003, b"d"]],
    [5461, 16383, [b"", 7001, b"b"]],
]


class SlotMapTests(unittest.TestCase):
    """Parsing topology replies and the map built from them."""

    def test_shards(self) -> None:
        """Per shard its online master; failed masters own nothing; '?'/'' hosts are the answering node."""
        ranges = parse_cluster_shards(SHARDS_REPLY, "10.0.0.9")
        self.assertEqual(ranges, [(0, 5460, ("127.0.0.1", 7000)), (5461, 10922, ("10.0.0.9", 7004))])
        slot_map = SlotMap(ranges)
        self.assertFalse(slot_map.covered())
        self.assertEqual(slot_map.ranges()[-1], (10923, 16383, None))
        self.assertEqual(slot_map.primaries(), [("127.0.0.1", 7000), ("10.0.0.9", 7004)])

    def test_slots(self) -> None:
        """CLUSTER SLOTS: the first node of each range is its primary."""
        ranges = parse_cluster_slots(SLOTS_REPLY, "10.0.0.9")
        self.assertEqual(ranges, [(0, 5460, ("127.0.0.1", 7000)), (5461, 16383, ("10.0.0.9", 7001))])
        self.assertTrue(SlotMap(ranges).covered())

    @given(st.lists(st.tuples(st.integers(0, SLOTS - 1), st.integers(0, 3)), max_size=30))
    def test_ranges_round_trip(self, cuts: list) -> None:
        """`ranges()` describes the map exactly: rebuilding from it gives the same map."""
        slot_map = SlotMap()
        for slot, owner in sorted(cuts):
            slot_map.owners[slot:] = [("h", 7000 + owner) if owner else None] * (SLOTS - slot)
        ranges = slot_map.ranges()
        self.assertEqual(SlotMap([r for r in ranges if r[2] is not None]), slot_map)  # type: ignore[misc]
        self.assertEqual(sum(last - first + 1 for first, last, _ in ranges), SLOTS)


ROUTE = '\n[[route]]\npath = "/a"\nlist = "a"\n'


class ClusterConfigTests(unittest.TestCase):
    """`[redis] cluster` in the config."""

    def test_seeds(self) -> None:
        """Seeds parse to (host, port); host/port are the first seed's; credentials carry over."""
        c = config_from_string('[redis]\ncluster = ["redis://u:pw@10.0.0.1:7000", "redis://u:pw@10.0.0.2"]\n' + ROUTE).redis
        self.assertEqual(c.cluster, (("10.0.0.1", 7000), ("10.0.0.2", 6379)))
        self.assertEqual((c.host, c.port, c.db, c.username, c.password), ("10.0.0.1", 7000, 0, "u", "pw"))
        self.assertEqual(config_from_string(ROUTE).redis.cluster, ())

    def test_errors(self) -> None:
        """Each bad value is one error naming the key."""
        cases = {
            '[redis]\nurl = "redis://h:1"\ncluster = ["redis://h:2"]\n': "redis.cluster: set either",
            "[redis]\ncluster = []\n": "redis.cluster: expected a non-empty list",
            '[redis]\ncluster = "redis://h:1"\n': "redis.cluster: expected a non-empty list",
            '[redis]\ncluster = ["redis://h:1/2"]\n': "redis.cluster[0]: a Redis Cluster has only db 0",
            '[redis]\ncluster = ["redis://h:1", "http://h"]\n': "redis.cluster[1]: expected redis://",
            '[redis]\ncluster = ["redis://a@h:1", "redis://h:2"]\n': "redis.cluster[1]: every seed",
        }
        for text, message in cases.items():
            with self.assertRaises(ConfigError) as e:
                config_from_string(text + ROUTE)
            self.assertIn(message, str(e.exception))
            self.assertNotIn("\n", str(e.exception))


def cluster_config(cluster: RedisCluster, **kw: Any) -> RedisConfig:
    """A RedisConfig seeded with the cluster's first node only (the rest is discovered)."""
    kw.setdefault("reply_timeout", 5.0)
    kw.setdefault("connect_timeout", 2.0)
    port = cluster.nodes[0].port
    return RedisConfig(host="127.0.0.1", port=port, cluster=(("127.0.0.1", port),), **kw)


def owner_port(node: RedisServer, key: str) -> int:
    """Who `node` says owns `key`'s slot."""
    slot = int(node.command("CLUSTER", "KEYSLOT", key))
    for r in node.command("CLUSTER", "SLOTS"):
        if int(r[0]) <= slot <= int(r[1]):
            return int(r[2][1])
    raise AssertionError(slot)


def move_slot(cluster: RedisCluster, slot: int, source: RedisServer, target: RedisServer, finish: bool = True) -> None:
    """Migrate `slot` from `source` to `target` by hand (what ``redis-cli --cluster reshard`` does per slot).

    With ``finish=False`` the slot is left half-way (migrating on the
    source, importing on the target) with no keys moved: the source then
    answers ASK for keys it does not hold.
    """
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    if not finish:
        return
    while True:
        keys = source.command("CLUSTER", "GETKEYSINSLOT", slot, 100)
        if not keys:
            break
        source.command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    for node in cluster.primaries():
        node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


class ClusterClientTests(TestCase):
    """ClusterClient against a real 3-primary cluster (no replicas: faster, and kills stay down)."""

    timeout = 180

    def setUp(self) -> None:
        self.cluster = RedisCluster(self, primaries=3, replicas=0)

    async def ready_client(self, **kw: Any) -> ClusterClient:
        """A started ClusterClient that sees every primary."""
        observed: dict = {}
        client = ClusterClient(reactor, cluster_config(self.cluster, **kw), lambda node: observed.setdefault(node, []).append)
        client.startService()
        self.addCleanup(client.stopService)
        await until(lambda: client.ready, "the cluster client to be ready")
        self.observed = observed
        return client

    async def test_routes_each_key_to_its_primary(self) -> None:
        """From one seed, the client finds all 3 primaries and each LPUSH lands on its slot's owner."""
        client = await self.ready_client()
        keys = keys_on_each_primary(self.cluster)
        self.assertEqual(len(keys), 3)
        for i, key in enumerate(keys):
            self.assertEqual(await client.lpush(key.encode(), [b"a\x00\xff", b"%d" % i]), 2)
        for i, key in enumerate(keys):
            node = self.cluster.primary_for(key)
            self.assertEqual(node.command("LRANGE", key, 0, -1), [b"%d" % i, b"a\x00\xff"])
            self.assertTrue(client.ready_for(key.encode()))
        self.assertEqual(client.unwritable_slots(), [])
        self.assertEqual(len(client.describe()["primaries"]), 3)
        self.assertEqual(len(self.observed), 3)  # one latency series per node...
        self.assertTrue(all(self.observed.values()), self.observed)  # ...and each saw its LPUSH

    async def test_follows_moved(self) -> None:
        """A slot moved behind the client's back: MOVED is followed, the map updated, nothing lost."""
        client = await self.ready_client()
        key = keys_on_each_primary(self.cluster)[0]
        source = self.cluster.primary_for(key)
        target = next(n for n in self.cluster.primaries() if n is not source)
        await client.lpush(key.encode(), [b"before"])
        move_slot(self.cluster, key_slot(key.encode()), source, target)
        self.assertEqual(owner_port(target, key), target.port)
        self.assertEqual(await client.lpush(key.encode(), [b"after"]), 2)  # sent to source, MOVED to target
        self.assertEqual(target.command("LRANGE", key, 0, -1), [b"after", b"before"])
        self.assertEqual(client._owners[key_slot(key.encode())], ("127.0.0.1", target.port))

    async def test_follows_ask(self) -> None:
        """A slot half-way through migration: the source answers ASK, the client sends ASKING + LPUSH to the target."""
        client = await self.ready_client()
        key = keys_on_each_primary(self.cluster)[1]
        slot = key_slot(key.encode())
        source = self.cluster.primary_for(key)
        target = next(n for n in self.cluster.primaries() if n is not source)
        move_slot(self.cluster, slot, source, target, finish=False)
        self.assertEqual(await client.lpush(key.encode(), [b"x"]), 1)
        self.assertEqual(source.command("CLUSTER", "COUNTKEYSINSLOT", slot), 0)
        with RespClient("127.0.0.1", target.port) as c:
            c.command("ASKING")
            self.assertEqual(c.command("LRANGE", key, 0, -1), [b"x"])
        # ASK does not change the map: the slot still belongs to the source.
        self.assertEqual(client._owners[slot], ("127.0.0.1", source.port))

    async def test_dead_primary_makes_only_its_slots_unwritable(self) -> None:
        """kill -9 of a primary without replica: its slots are listed unwritable, the others stay writable."""
        client = await self.ready_client()
        keys = keys_on_each_primary(self.cluster)
        victim = self.cluster.primary_for(keys[0])
        victim_ranges = [(f, last) for f, last, p in self.cluster.ranges() if p == victim.port]
        victim.kill()
        await until(lambda: not client.ready, "the client to notice the dead primary")
        self.assertEqual(client.unwritable_slots(), victim_ranges)
        self.assertFalse(client.ready_for(keys[0].encode()))
        self.assertTrue(client.ready_for(keys[1].encode()))
        with self.assertRaises(ConnectionError):
            await client.lpush(keys[0].encode(), [b"v"])  # fails at once, does not wait
        self.assertEqual(await client.lpush(keys[1].encode(), [b"v"]), 1)

    async def test_probe(self) -> None:
        """The start-up probe: a cluster seed passes; a stand-alone Redis and a closed port do not."""
        self.assertIsNone(probe_cluster(cluster_config(self.cluster)))
        plain = RedisServer(self)
        closed = free_port()
        problem = probe_cluster(RedisConfig(cluster=(("127.0.0.1", plain.port), ("127.0.0.1", closed))))
        assert problem is not None
        self.assertIn("no seed answers as a Redis Cluster node", problem)
        self.assertIn(f"127.0.0.1:{plain.port}: not a cluster node", problem)
        self.assertIn(f"127.0.0.1:{closed}: cannot connect", problem)
        self.assertNotIn("\n", problem)


class FakeNode:
    """A node client double: answers each command through `answer(address, args)`."""

    def __init__(self, address: tuple, answer: Any) -> None:
        self.address = address
        self.answer = answer
        self.ready = True
        self.running = False
        self.commands: list = []
        self._ready: list = []
        self._lost: list = []

    def on_ready(self, listener: Any) -> None:
        """Record a ready listener."""
        self._ready.append(listener)

    def on_lost(self, listener: Any) -> None:
        """Record a lost listener."""
        self._lost.append(listener)

    def startService(self) -> None:
        """Start: ready at once, like a connection that came up."""
        self.running = True
        for listener in self._ready:
            listener()

    def stopService(self) -> Any:
        """Stop."""
        from twisted.internet.defer import succeed

        self.running = False
        return succeed(None)

    def execute(self, *args: Any) -> Any:
        """Record the command; answer it."""
        from twisted.internet.defer import fail, succeed

        self.commands.append(args)
        result = self.answer(self.address, args)
        return fail(result) if isinstance(result, Exception) else succeed(result)


def shards(*owners: tuple) -> list:
    """A CLUSTER SHARDS reply splitting the slots evenly among `owners`."""
    step = SLOTS // len(owners)
    out = []
    for i, (host, port) in enumerate(owners):
        last = SLOTS - 1 if i == len(owners) - 1 else (i + 1) * step - 1
        node = [b"port", port, b"endpoint", host.encode(), b"role", b"master", b"health", b"online"]
        out.append([b"slots", [i * step, last], b"nodes", [node]])
    return out


class ClusterClientUnitTests(unittest.TestCase):
    """Bounds of the client's own logic, on a fake clock with node doubles."""

    def build(self, answer: Any) -> tuple:
        """A started client over nodes A and B (seed A) whose commands go to `answer`."""
        from twisted.internet.task import Clock

        clock = Clock()
        nodes: dict = {}

        def factory(address: tuple) -> FakeNode:
            nodes[address] = FakeNode(address, answer)
            return nodes[address]

        client = ClusterClient(clock, RedisConfig(cluster=(("a", 1),)), node_factory=factory)  # type: ignore[arg-type]
        client.startService()
        return client, clock, nodes

    def test_redirect_loop_is_bounded(self) -> None:
        """Two nodes that keep answering MOVED to each other: the command fails after MAX_REDIRECTS, no loop."""
        from relayd.redis.client import ResponseError
        from relayd.redis.cluster import MAX_REDIRECTS

        def answer(address: tuple, args: tuple) -> Any:
            if args[0] == b"CLUSTER":
                return shards(("a", 1), ("b", 2))
            other = 2 if address[1] == 1 else 1
            return ResponseError(f"MOVED {key_slot(args[1])} {'ab'[other - 1]}:{other}")

        client, clock, nodes = self.build(answer)
        self.assertTrue(client.ready)
        failures: list = []
        client.lpush(b"k", [b"v"]).addErrback(failures.append)
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0].check(ResponseError))
        pushes = sum(1 for n in nodes.values() for c in n.commands if c[0] == b"LPUSH")
        self.assertEqual(pushes, MAX_REDIRECTS + 1)
        client.stopService()

    def test_refreshes_are_coalesced_and_stop_leaves_no_timer(self) -> None:
        """A burst of MOVED costs one map read per MIN_REFRESH_INTERVAL; stopping cancels every timer."""
        from relayd.redis.client import ResponseError
        from relayd.redis.cluster import MIN_REFRESH_INTERVAL

        moved = {"on": True}

        def answer(address: tuple, args: tuple) -> Any:
            if args[0] == b"CLUSTER":
                return shards(("a", 1), ("b", 2))
            if address == ("a", 1) and moved["on"]:
                return ResponseError(f"MOVED {key_slot(args[1])} b:2")
            return 1

        client, clock, nodes = self.build(answer)
        reads = lambda: sum(1 for n in nodes.values() for c in n.commands if c[0] == b"CLUSTER")  # noqa: E731
        before = reads()
        keys = [b"k%d" % i for i in range(200) if client._owners[key_slot(b"k%d" % i)] == ("a", 1)]
        clock.advance(MIN_REFRESH_INTERVAL)
        for key in keys:
            client.lpush(key, [b"v"])
            client._map.set_owner(key_slot(key), ("a", 1))  # as if the map were still stale
        self.assertLessEqual(reads() - before, 1)
        clock.advance(MIN_REFRESH_INTERVAL)
        self.assertLessEqual(reads() - before, 2)
        client.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
