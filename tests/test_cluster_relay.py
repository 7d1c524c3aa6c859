"""The real daemon (``twistd -n relayd``) against a real local Redis Cluster.

test-case-name: tests.test_cluster_relay

Each test starts a cluster (`tests.cluster_harness.RedisCluster`) and relayd
with ``[redis] cluster = [seeds]``, posts through real sockets, and asks the
oracle (`tests.harness.Oracle`: every acknowledged message is in Redis,
nothing unknown is, payloads match).  Lists are chosen so that every
primary holds one.  The faults are the ones a cluster has: a primary
killed (its replica is promoted), slots resharded under load, and the
cluster in ``fail`` state (a frozen primary) so that relayd spills and
replays.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import unittest
from typing import Any, Callable

from relayd.redis.keys import key_slot
from tests.cluster_harness import REDIS_CLI, RedisCluster, keys_on_each_primary
from tests.fault_tools import LoadGenerator, metric_values
from tests.harness import Oracle, RedisServer, RelaydProcess, RespClient, decode_item, json_body, ndjson, wait_for

#: Messages per second each load generator offers (one per route).
LOAD_RATE = 100.0
#: Hard caps per load generator.
LOAD_LIMIT = 5000
LOAD_DURATION = 90.0
#: [redis] reply_timeout: a dead or frozen primary costs requests 1 s, not 5.
REPLY_TIMEOUT = 1.0
#: Seconds for acknowledged messages to reach Redis after a fault ends.
ARRIVAL_TIMEOUT = 30.0
#: Seconds for the cluster to promote a replica and relayd to follow
#: (node timeout 1 s + election; generous for a loaded 2-core box).
FAILOVER_TIMEOUT = 30.0
#: Seconds the frozen primary stays frozen (the node timeout is 1 s: the
#: cluster goes to fail state within that).
FREEZE_SECONDS = 3.0
#: Slots moved by the reshard test (its list's slot is among them).
RESHARD_SLOTS = 64
#: Seconds before the kill within which a lost message must have been
#: acknowledged: Redis' replication lag on loopback is well under a
#: millisecond; this allows a replica starved on a loaded 2-core box.
REPLICATION_WINDOW = 2.0
#: Duplicates allowed per list: a command that timed out around a fault may
#: have run (at-least-once); a few batches' worth at this load.
MAX_DUPLICATES = 500
#: Messages each healthy list must gain while one primary is frozen: a few
#: seconds of LOAD_RATE, so the outage lasts well past relayd noticing it.
GROWTH_DURING_OUTAGE = 200


def routes_for(lists: list[str]) -> list[dict[str, Any]]:
    """One route ``/<list>`` per list."""
    return [{"path": f"/{name}", "list": name} for name in lists]


class ClusterRelayTestCase(unittest.TestCase):
    """Fixtures: a cluster, relayd on it, load generators."""

    cluster: RedisCluster
    relayd: RelaydProcess

    def start(
        self, primaries: int = 3, replicas: int = 0, choose: Callable[[RedisCluster], list[str]] = keys_on_each_primary,
        full_coverage: bool = True, **relayd_kw: Any,
    ) -> list[str]:  # fmt: skip
        """Start the cluster and relayd with one route per list `choose` picks (default: one per primary)."""
        self.cluster = RedisCluster(self, primaries=primaries, replicas=replicas, full_coverage=full_coverage)
        lists = choose(self.cluster)
        redis = {"cluster": self.cluster.seeds[:2], "reply_timeout": REPLY_TIMEOUT, **relayd_kw.pop("redis", {})}
        self.relayd = RelaydProcess(self, routes=routes_for(lists), redis_url=None, redis=redis, **relayd_kw)
        return lists

    def load(self, oracle: Oracle, path: str) -> LoadGenerator:
        """A started load generator on `path` (stopped in cleanup at the latest)."""
        gen = LoadGenerator(oracle, self.relayd, path, threads=2, rate=LOAD_RATE, limit=LOAD_LIMIT, duration=LOAD_DURATION)
        self.addCleanup(gen.stop)
        return gen.start()

    def readyz(self) -> dict[str, Any]:
        """relayd's /readyz body (with the cluster details)."""
        status, _headers, body = self.relayd.get_admin("/readyz", timeout=5.0)
        return {"status_code": status, **json.loads(body)}

    def wait_arrival(self, oracle: Oracle, key: str, acked: set[str] | None = None) -> None:
        """Until the acknowledged messages (or `acked`) are all in `key`."""
        want = set(oracle.acked) if acked is None else acked
        try:
            wait_for(lambda: want <= oracle.cids_in(self.cluster, key), ARRIVAL_TIMEOUT, f"acknowledged messages in {key}")
        except AssertionError as e:
            missing = want - oracle.cids_in(self.cluster, key)
            raise AssertionError(f"{e}: {len(missing)} missing; log tail:\n{self.relayd.log_tail()}") from None


class ClusterIngestTests(ClusterRelayTestCase):
    """The ingest path into a healthy cluster; bad cluster configs."""

    def test_posts_reach_every_primary(self) -> None:
        """Single posts and NDJSON batches on three routes land on three primaries; /readyz and /metrics say so."""
        lists = self.start()
        self.assertEqual(len({self.cluster.primary_for(k).port for k in lists}), 3)
        for name in lists:
            oracle = Oracle(route=f"/{name}")
            for _ in range(20):
                self.assertEqual(oracle.post(self.relayd, f"/{name}")[0], 200)  # type: ignore[index]
            batch = [oracle.new_message() for _ in range(50)]
            for cid, body in batch:
                oracle.send(cid, body)
            resp = self.relayd.post(f"/{name}", ndjson(b for _, b in batch), {"Content-Type": "application/x-ndjson"})
            self.assertEqual(resp[0], 200, resp)
            for (cid, _), message_id in zip(batch, json_body(resp)["ids"]):
                oracle.acknowledge(cid, message_id)
            self.wait_arrival(oracle, name)
            report = oracle.assert_ok(self, self.cluster, name)
            self.assertEqual(report.unique, 70)
        ready = self.readyz()
        self.assertEqual(ready["status_code"], 200, ready)
        self.assertEqual(ready["redis_cluster"]["unwritable_slots"], [])
        self.assertEqual(len(ready["redis_cluster"]["primaries"]), 3)
        self.assertTrue(all(ready["redis_cluster"]["primaries"].values()), ready)
        status, _h, body = self.relayd.get_admin("/metrics")
        nodes = {line.split('node="')[1].split('"')[0] for line in body.decode().splitlines()
                 if line.startswith("relayd_redis_node_roundtrip_seconds_count")}  # fmt: skip
        self.assertEqual(nodes, {f"127.0.0.1:{self.cluster.primary_for(k).port}" for k in lists})

    def test_idempotency_keys_on_every_primary(self) -> None:
        """Idempotency-Key on a cluster: the script's marker keys are companions of the list, so it runs on the
        list's primary; a repeat is answered as a duplicate and stored once, on each of the three primaries."""
        lists = self.start()
        for name in lists:
            first = self.relayd.post(f"/{name}", b'{"n": 1}', {"Idempotency-Key": f"order-{name}"})
            again = self.relayd.post(f"/{name}", b'{"n": 1}', {"Idempotency-Key": f"order-{name}"})
            self.assertEqual(first[0], 200, first)
            self.assertEqual(again[0], 200, again)
            self.assertEqual(json_body(again)["id"], json_body(first)["id"])
            wait_for(lambda n=name: self.cluster.llen(n) >= 1, ARRIVAL_TIMEOUT, f"the message in {name}")
            self.assertEqual(self.cluster.llen(name), 1)

    def test_two_workers_on_a_cluster(self) -> None:
        """workers = 2: each worker routes to every primary; the supervisor's merged /metrics keeps the node series."""
        lists = self.start(server={"workers": 2})
        for name in lists:
            oracle = Oracle(route=f"/{name}")
            for _ in range(30):
                self.assertEqual(oracle.post(self.relayd, f"/{name}", keep_alive=False)[0], 200)  # type: ignore[index]
            self.wait_arrival(oracle, name)
            oracle.assert_ok(self, self.cluster, name)
        _status, _h, body = self.relayd.get_admin("/metrics")
        counts = {line.split('node="')[1].split('"')[0]: float(line.split()[-1]) for line in body.decode().splitlines()
                  if line.startswith("relayd_redis_node_roundtrip_seconds_count")}  # fmt: skip
        self.assertEqual(set(counts), {f"127.0.0.1:{self.cluster.primary_for(k).port}" for k in lists})
        self.assertGreaterEqual(sum(counts.values()), 3)

    def test_request_reply_on_a_cluster(self) -> None:
        """Request/reply: the request list and each process's reply list may sit on different primaries; every
        request gets its own reply (the inbox's blocking reader is cluster-aware too)."""
        self.cluster = RedisCluster(self, primaries=3, replicas=0)
        (name,) = keys_on_each_primary(self.cluster)[:1]
        self.relayd = RelaydProcess(
            self, routes=[{"path": "/quote", "list": name, "reply_timeout": "5s"}], redis_url=None,
            redis={"cluster": self.cluster.seeds[:1], "reply_timeout": REPLY_TIMEOUT}, server={"workers": 2},
        )  # fmt: skip
        # /readyz does not wait for the reply readers; each registers its list once it reads.
        wait_for(
            lambda: self.cluster.command_for("relayd:reply-lists", "ZCARD", "relayd:reply-lists") == 2,
            10.0,
            "both reply readers to start",
        )
        stop = threading.Event()
        reply_lists: set[str] = set()

        def worker() -> None:
            # A consumer as users write it: BRPOP the request list on its primary, LPUSH
            # the reply to `reply_to` on *that* key's primary.
            with RespClient("127.0.0.1", self.cluster.primary_for(name).port, timeout=5) as c:
                while not stop.is_set():
                    popped = c.command("BRPOP", name, 1)
                    if popped is None:
                        continue
                    envelope = json.loads(popped[1])
                    reply_lists.add(envelope["reply_to"])
                    reply = json.dumps({"id": envelope["id"], "body": {"echo": envelope["body"]}})
                    self.cluster.command_for(envelope["reply_to"], "LPUSH", envelope["reply_to"], reply)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        self.addCleanup(lambda: (stop.set(), thread.join(10)))
        for i in range(40):
            status, _headers, body = self.relayd.post("/quote", json.dumps({"i": i}).encode(), keep_alive=False)
            self.assertEqual((status, json.loads(body)), (200, {"echo": {"i": i}}))
        slots = {key_slot(r.encode()) for r in reply_lists}
        self.assertEqual(len(reply_lists), 2, reply_lists)  # one reply list per worker process
        print(f"\nrequest/reply: reply lists in slots {sorted(slots)}, requests in slot {key_slot(name.encode())}")

    def test_seeds_that_are_no_cluster_exit_2(self) -> None:
        """A seed list where nothing answers as a cluster: exit 2, one line naming redis.cluster, no port bound."""
        plain = RedisServer(self)
        relayd = RelaydProcess(
            self, routes=routes_for(["a"]), redis_url=None,
            redis={"cluster": [f"redis://127.0.0.1:{plain.port}"]}, wait_ready=False,
        )  # fmt: skip
        self.assertEqual(relayd.wait(), 2, relayd.log_tail())
        lines = relayd.stderr_text().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("redis.cluster: no seed answers as a Redis Cluster node", lines[0])

    def test_cluster_with_url_exits_2(self) -> None:
        """`cluster` and `url` together: exit 2 with one line."""
        relayd = RelaydProcess(
            self, routes=routes_for(["a"]), redis_url="redis://127.0.0.1:1/0",
            redis={"cluster": ["redis://127.0.0.1:2"]}, wait_ready=False,
        )  # fmt: skip
        self.assertEqual(relayd.wait(), 2, relayd.log_tail())
        lines = relayd.stderr_text().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("redis.cluster: set either redis.url", lines[0])


class ClusterFaultTests(ClusterRelayTestCase):
    """Failover, resharding and a cluster in fail state, under load."""

    def test_failover_under_load(self) -> None:
        """kill -9 a primary while clients post: the replica is promoted, relayd follows, the other lists lose nothing.

        On the killed primary's list, a message is lost only if Redis
        acknowledged it to relayd before the kill and had not yet streamed
        it to the replica (Redis replicates asynchronously): the test
        asserts every missing message was acknowledged before the kill,
        within `REPLICATION_WINDOW`, and every message acknowledged after it is
        there.
        """
        lists = self.start(replicas=1)
        oracles = {name: Oracle(route=f"/{name}") for name in lists}
        gens = {name: self.load(oracles[name], f"/{name}") for name in lists}
        wait_for(lambda: all(len(o.acked) >= 100 for o in oracles.values()), 30, "100 acks per route")
        victim_key = lists[0]
        victim = self.cluster.primary_for(victim_key)
        replica = self.cluster.replica_of(victim)
        victim.kill()
        killed_at = time.monotonic()
        # The replica takes over; every live node agrees; relayd follows (readyz lists no unwritable slot).
        wait_for(lambda: self.cluster.primary_for(victim_key) is replica, FAILOVER_TIMEOUT, "the replica to be promoted")
        self.cluster.wait_ok(expected_primaries=3, timeout=FAILOVER_TIMEOUT)
        wait_for(
            lambda: self.readyz().get("redis_cluster", {}).get("unwritable_slots") == []
            and f"127.0.0.1:{replica.port}" in self.readyz()["redis_cluster"]["primaries"],
            FAILOVER_TIMEOUT,
            "relayd to write to the promoted replica",
        )
        followed_at = time.monotonic()
        wait_for(lambda: gens[victim_key].count(lambda o: o.ok and o.sent_at > followed_at) >= 100, 30, "acks after the failover")
        for gen in gens.values():
            gen.stop()
        for name in lists[1:]:
            self.wait_arrival(oracles[name], name)
            oracles[name].assert_ok(self, self.cluster, name, max_duplicates=MAX_DUPLICATES)
        gen = gens[victim_key]
        after = {o.cid for o in gen.snapshot() if o.ok and o.sent_at > killed_at}
        self.wait_arrival(oracles[victim_key], victim_key, acked=after)
        report = oracles[victim_key].check(self.cluster, victim_key)
        done_at = {o.cid: o.done_at for o in gen.snapshot()}
        late = [cid for cid in report.missing if done_at[cid] > killed_at]
        self.assertEqual(late, [], "messages acknowledged after the kill are missing")
        # Redis' async-replication window: what the dead primary acked but never sent on.
        window = [killed_at - done_at[cid] for cid in report.missing]
        self.assertTrue(
            all(w < REPLICATION_WINDOW for w in window), f"lost messages acked long before the kill: {sorted(window)[-5:]}"
        )
        self.assertEqual(report.unknown + report.mismatched, [])
        print(f"\nfailover: {len(oracles[victim_key].acked)} acked on the victim's list, {len(report.missing)} lost "
              f"in the replication window, {report.duplicates} duplicates, relayd followed "
              f"{followed_at - killed_at:.1f}s after the kill")  # fmt: skip

    def test_reshard_under_load(self) -> None:
        """``redis-cli --cluster reshard`` moves a list's slot while clients post: MOVED/ASK followed, nothing lost."""

        def low_slot_list(cluster: RedisCluster) -> list[str]:
            # reshard takes the source's lowest slots first: a list among them moves.
            first = cluster.ranges()[0][0]
            return [next(f"resh-{i}" for i in range(100_000) if first <= key_slot(b"resh-%d" % i) < first + RESHARD_SLOTS // 2)]

        (name,) = self.start(choose=low_slot_list)
        source = self.cluster.node_at(self.cluster.ranges()[0][2])
        target = next(n for n in self.cluster.primaries() if n is not source)
        oracle = Oracle(route=f"/{name}")
        gen = self.load(oracle, f"/{name}")
        wait_for(lambda: len(oracle.acked) >= 200, 30, "200 acks before the reshard")
        out = subprocess.run(
            [REDIS_CLI, "--cluster", "reshard", f"127.0.0.1:{source.port}",
             "--cluster-from", self.cluster.node_id(source), "--cluster-to", self.cluster.node_id(target),
             "--cluster-slots", str(RESHARD_SLOTS), "--cluster-yes", "--cluster-pipeline", "10"],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        self.assertEqual(out.returncode, 0, out.stdout.decode()[-2000:] + out.stderr.decode())
        self.assertIs(self.cluster.primary_for(name), target)
        moved_at = time.monotonic()
        wait_for(lambda: gen.count(lambda o: o.ok and o.sent_at > moved_at) >= 100, 30, "acks after the reshard")
        gen.stop()
        self.wait_arrival(oracle, name)
        report = oracle.assert_ok(self, self.cluster, name, max_duplicates=MAX_DUPLICATES)
        self.assertEqual(source.command("CLUSTER", "COUNTKEYSINSLOT", key_slot(name.encode())), 0)
        print(f"\nreshard: {len(oracle.acked)} acked, all in Redis, {report.duplicates} duplicates")

    def test_one_primary_down_spools_only_its_share(self) -> None:
        """SIGSTOP one primary of three (no replica; ``cluster-require-full-coverage no``, so the other
        shards keep serving) while clients post to a list on each primary.

        During the outage the lists on the healthy primaries keep growing
        and relayd never enters global spill mode; the frozen primary's
        requests are answered 2xx only once spooled (none of them can be in
        Redis); after SIGCONT the replay stores them, the list goes direct
        again, and the oracle finds every acknowledged message on every list.
        """
        lists = self.start(full_coverage=False)
        oracles = {name: Oracle(route=f"/{name}") for name in lists}
        gens = {name: self.load(oracles[name], f"/{name}") for name in lists}
        wait_for(lambda: all(len(o.acked) >= 50 for o in oracles.values()), 30, "50 acks per route")
        victim_key, healthy = lists[0], lists[1:]
        victim = self.cluster.primary_for(victim_key)
        spill_modes: list[float] = []

        def metrics() -> dict[str, float]:
            # Every scrape also samples the global spill mode: it must stay 0 throughout.
            values = metric_values(self.relayd)
            spill_modes.append(values.get("relayd_spill_mode", 0.0))
            return values

        spilled_before = metrics().get("relayd_spilled_total", 0.0)
        victim.pause()
        paused_at = time.monotonic()
        wait_for(lambda: metrics().get("relayd_spill_targets", 0) >= 1, 30, "relayd to spool the frozen list")
        noticed_at = time.monotonic()
        start_len = {name: self.cluster.llen(name) for name in healthy}
        for name in healthy:
            wait_for(lambda n=name: metrics() is not None and self.cluster.llen(n) >= start_len[n] + GROWTH_DURING_OUTAGE,
                     60, f"{name} to grow while a primary is frozen")  # fmt: skip
        grew = [self.cluster.llen(n) - start_len[n] for n in healthy]
        wait_for(lambda: gens[victim_key].count(lambda o: o.ok and o.sent_at > noticed_at) >= 20, 30,
                 "the frozen list's requests to be answered from the spool")  # fmt: skip
        scraped_at = time.monotonic()
        during = metrics()
        resumed_at = time.monotonic()
        victim.resume()
        # Acknowledged while the primary was frozen (and before that scrape):
        # only the spool can have them, so the spill counter covers them.
        acked_frozen = gens[victim_key].count(lambda o: o.ok and o.sent_at > paused_at and o.done_at < scraped_at)
        self.assertGreater(acked_frozen, 0)
        self.assertGreaterEqual(during.get("relayd_spilled_total", 0.0) - spilled_before, acked_frozen)
        self.cluster.wait_ok(expected_primaries=3, timeout=FAILOVER_TIMEOUT)
        back_at = time.monotonic()
        wait_for(lambda: gens[victim_key].count(lambda o: o.ok and o.sent_at > back_at) >= 50, 60, "acks after the resume")
        wait_for(lambda: metrics().get("relayd_spill_targets", 1) == 0, 30, "the frozen list to go direct again")
        for gen in gens.values():
            gen.stop()
        self.assertEqual(max(spill_modes), 0.0, "global spill mode started")
        for name, oracle in oracles.items():
            self.wait_arrival(oracle, name)
            # FIFO per list: relayd's ids sort by arrival, so the first copy of
            # each message must come in id order, across the detour too.
            firsts: list[str] = []
            seen: set[str] = set()
            for item in self.cluster.items(name):
                envelope, _body = decode_item(item)
                assert envelope is not None
                if envelope["id"] not in seen:
                    seen.add(envelope["id"])
                    firsts.append(envelope["id"])
            out_of_order = [(a, b) for a, b in zip(firsts, firsts[1:]) if b < a]
            self.assertEqual(out_of_order[:3], [], f"{name}: {len(out_of_order)} messages ahead of older ones")
            oracle.assert_ok(self, self.cluster, name, max_duplicates=MAX_DUPLICATES)
        print(f"\none primary frozen {resumed_at - paused_at:.1f}s (noticed after {noticed_at - paused_at:.1f}s): "
              f"healthy lists grew by {grew} meanwhile; {acked_frozen} frozen-list requests acked from the spool")  # fmt: skip

    def test_cluster_fail_state_spills_and_replays(self) -> None:
        """A frozen primary puts the cluster in fail state: relayd spills to disk, then replays; nothing acked is lost."""
        lists = self.start()
        oracles = {name: Oracle(route=f"/{name}") for name in lists[:2]}
        gens = {name: self.load(oracles[name], f"/{name}") for name in oracles}
        wait_for(lambda: all(len(o.acked) >= 50 for o in oracles.values()), 30, "50 acks per route")
        frozen = self.cluster.primary_for(lists[0])
        frozen.pause()
        wait_for(lambda: self.readyz().get("redis_cluster", {}).get("unwritable_slots"), 30, "relayd to see unwritable slots")
        time.sleep(FREEZE_SECONDS)  # the outage's length (the scenario), not a wait for an event
        frozen.resume()
        self.cluster.wait_ok(expected_primaries=3, timeout=FAILOVER_TIMEOUT)
        resumed_at = time.monotonic()
        wait_for(lambda: all(g.count(lambda o: o.ok and o.sent_at > resumed_at) >= 50 for g in gens.values()), 30, "acks after")
        for gen in gens.values():
            gen.stop()
        spilled = metric_values(self.relayd).get("relayd_spilled_total", 0)
        for name, oracle in oracles.items():
            self.wait_arrival(oracle, name)
            oracle.assert_ok(self, self.cluster, name, max_duplicates=MAX_DUPLICATES)
        self.assertGreater(spilled, 0, "nothing went through the spool")


if __name__ == "__main__":
    unittest.main()
