#!/usr/bin/env python3
"""One relayd core writing NDJSON into 1 Redis vs a 3-primary Redis Cluster.

The question (issue 15): does the cluster layer (slot routing, one
connection per primary, MOVED/ASK bookkeeping) cost relayd throughput per
core?  Target: the cluster figure is >= 0.9x the single-Redis one.

Three setups are started once and stay up for the whole run:

- A: relayd -> one ``redis-server``;
- B: relayd -> a cluster of 3 primaries (no replicas: replicas would add
  Redis CPU on this 2-core box without changing relayd's work), with three
  routes whose lists sit on the three primaries;
- C (control): a relayd on the same cluster whose three lists all sit on
  one primary, to tell the client's cost from that of 3 Redis processes.

Then short load runs alternate A B C, C B A, A B C, ... (the order flips
every round so neither side always follows the other), so drift in the
shared machine's load hits every setup alike.  Each round gives a ratio
B/A (and C/A) from runs seconds apart; the report is the median of those
per-round ratios, plus the per-run table.

relayd processes run on core 0 (``taskset -c 0``; the idle ones cost
nothing), wrk and every Redis on core 1; wrk (-t1 -c16) posts NDJSON
batches of 1000 ~200-byte lines, ``ack = "stored"``, round-robin over the
setup's routes (bench/ndjson_paths.lua).  Reported per run: messages/s,
ack latency p50/p99, and CPU seconds per million messages of relayd and of
that setup's Redis processes (all nodes together), from /proc/<pid>/stat.
Every run checks that Redis holds at least what was acknowledged, then
UNLINKs the lists (memory stays flat however many rounds).

Usage: ``python bench/cluster_bench.py [--seconds 5] [--rounds 6]``; prints
a markdown section for docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
TWISTD = os.path.join(ROOT, ".venv", "bin", "twistd")
LINES = 1000  # NDJSON lines per request (ndjson.lua's default)
CONNECTIONS = 16  # wrk connections: enough to keep one relayd core busy, few enough not to spill
ROUTING_CALLS = 200_000  # commands timed by the in-process routing micro-benchmark
TICKS = os.sysconf("SC_CLK_TCK")
sys.path.insert(0, ROOT)

from relayd.redis.keys import key_slot  # noqa: E402


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_until(cond, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = cond()
        except Exception:  # noqa: BLE001 - not yet
            value = None
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True).stdout.strip()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


class Redis:
    """redis-server processes on core 1: one stand-alone, or N cluster primaries."""

    def __init__(self, workdir: str, primaries: int) -> None:
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        for _ in range(primaries):
            port, bus = free_port(), free_port()
            d = os.path.join(workdir, f"redis-{port}")
            os.makedirs(d)
            args = ["taskset", "-c", "1", "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
                    "--save", "", "--appendonly", "no", "--protected-mode", "no"]
            if primaries > 1:
                args += ["--cluster-enabled", "yes", "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf"]
            self.procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, cwd=d))
            self.ports.append(port)
        for port in self.ports:
            wait_until(lambda p=port: cli(p, "PING") == "PONG", 10, "redis")
        if primaries > 1:
            subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                            "--cluster-yes"], capture_output=True, check=True)
            wait_until(lambda: all("cluster_state:ok" in cli(p, "CLUSTER", "INFO") for p in self.ports), 30, "cluster ok")

    def lists(self, spread: bool = True) -> list[str]:
        """3 list names: one per primary (`spread`), or all on the first primary; any 3 for one Redis."""
        if len(self.ports) == 1:
            return ["a", "b", "c"]
        ranges = self.slot_ranges()
        owners: dict[int, list[str]] = {}
        for i in range(10_000):
            name = f"list-{i}"
            slot = key_slot(name.encode())
            owners.setdefault(next(p for first, last, p in ranges if first <= slot <= last), []).append(name)
            if spread and len(owners) == len(self.ports):
                return [names[0] for _, names in sorted(owners.items())]
            if not spread and len(owners.get(ranges[0][2], [])) == 3:
                return owners[ranges[0][2]]
        raise SystemExit("could not find the lists")

    def slot_ranges(self) -> list[tuple[int, int, int]]:
        """(first, last, port) of every primary's slot ranges, from CLUSTER NODES."""
        out = []
        for line in cli(self.ports[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2]:
                continue
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for part in fields[8:]:
                first, _, last = part.partition("-")
                if first.isdigit():
                    out.append((int(first), int(last or first), port))
        return out

    def owner_port(self, slot: int) -> int:
        return next(p for first, last, p in self.slot_ranges() if first <= slot <= last)

    def llen_total(self, lists: list[str]) -> int:
        total = 0
        for name in lists:
            port = self.ports[0] if len(self.ports) == 1 else self.owner_port(key_slot(name.encode()))
            total += int(cli(port, "LLEN", name) or 0)
        return total

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(30)


class Relayd:
    def __init__(self, workdir: str, redis: Redis, lists: list[str]) -> None:
        self.port, self.admin = free_port(), free_port()
        self.conf = os.path.join(workdir, f"relayd-{self.port}.conf")
        if len(redis.ports) == 1:
            target = f'url = "redis://127.0.0.1:{redis.ports[0]}/0"'
        else:
            target = "cluster = [" + ", ".join(f'"redis://127.0.0.1:{p}"' for p in redis.ports) + "]"
        routes = "".join(f'[[route]]\npath = "/{n}"\nlist = "{n}"\nack = "stored"\nmax_lines = {LINES}\n' for n in lists)
        with open(self.conf, "w") as f:
            f.write(
                f'[server]\nlisten = "tcp:{self.port}:interface=127.0.0.1:backlog=1024"\n'
                f'admin = "tcp:{self.admin}:interface=127.0.0.1"\n'
                f"[redis]\n{target}\nreply_timeout = 5.0\n"
                f'[spool]\ndir = "{workdir}/spool-{self.port}"\nmax_bytes = "4GiB"\nfsync = "batch"\n'
                # A buffer large enough that wrk's 16 x 1000 messages in flight never pass
                # the spill high-water mark: the run measures the Redis path, not the spool.
                '[buffer]\nack_timeout = 30.0\nmax_messages = 2000000\nmax_bytes = "2GiB"\n' + routes
            )
        self.log = open(os.path.join(workdir, f"relayd-{self.port}.log"), "ab")  # noqa: SIM115
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(
            ["taskset", "-c", "0", TWISTD, "-n", "--pidfile=", "relayd", "--config", self.conf],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
        )

        def ready() -> bool:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=1).status == 200

        wait_until(ready, 60, "relayd ready")

    def spilled(self) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith("relayd_spilled_total "):
                return float(line.split()[1])
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def wrk(port: int, paths: list[str], seconds: int) -> dict:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency",
         "-s", os.path.join(BENCH, "ndjson_paths.lua"), f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, env=dict(os.environ, WRK_STATUS_HOOK="1", PATHS=",".join(paths)),
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("BENCHJSON "))
    return json.loads(line[len("BENCHJSON "):])


class Setup:
    """One relayd and its Redis (shared by B and C), with the lists its routes write."""

    def __init__(self, name: str, workdir: str, redis: Redis, spread: bool = True) -> None:
        self.name = name
        self.redis = redis
        self.lists = redis.lists(spread)
        self.paths = [f"/{n}" for n in self.lists]
        self.relayd = Relayd(workdir, redis, self.lists)
        wrk(self.relayd.port, self.paths, 2)  # warm-up: caches, connections, the spool's first segment
        self.clear()

    def clear(self) -> None:
        """UNLINK the lists (freed in Redis' background thread)."""
        for name in self.lists:
            port = self.redis.ports[0] if len(self.redis.ports) == 1 else self.redis.owner_port(key_slot(name.encode()))
            cli(port, "UNLINK", name)

    def run(self, seconds: int) -> dict:
        """One load run: throughput, latency, CPU per message of relayd and of this setup's Redis."""
        redis, relayd = self.redis, self.relayd
        before = (cpu_seconds(relayd.proc.pid), redis.cpu(), redis.llen_total(self.lists), relayd.spilled())
        d = wrk(relayd.port, self.paths, seconds)
        ok = d["requests"] - d["err_status"]
        messages = ok * LINES
        wait_until(lambda: redis.llen_total(self.lists) - before[2] >= messages, 60, "acked messages in Redis")
        after = (cpu_seconds(relayd.proc.pid), redis.cpu(), relayd.spilled())
        self.clear()
        secs = d["duration_us"] / 1e6
        return {
            "target": self.name,
            "msgs_per_s": messages / secs,
            "p50_ms": d["lat_p50_us"] / 1000,
            "p99_ms": d["lat_p99_us"] / 1000,
            "non2xx": d["err_status"],
            "relayd_cpu_per_M": (after[0] - before[0]) / messages * 1e6 if messages else float("nan"),
            "redis_cpu_per_M": (after[1] - before[1]) / messages * 1e6 if messages else float("nan"),
            "spilled": after[2] - before[3],
        }

    def stop(self) -> None:
        self.relayd.stop()


def routing_overhead() -> tuple[float, float]:
    """Microseconds per LPUSH call through ClusterClient vs straight to one node's client.

    In-process, no sockets: the nodes are stubs answering after all calls, so the
    difference is the cluster layer's own work per command (key, slot,
    owner lookup, redirect hook).  One command carries a whole batch (up
    to 1000 messages), so per message it is this divided by the batch size.
    """
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    from relayd.config import RedisConfig
    from relayd.redis.cluster import ClusterClient

    class Node:
        ready = True
        running = False

        def execute(self, *args):  # type: ignore[no-untyped-def]
            d: Deferred = Deferred()  # answered later, as a real reply is
            pending.append(d)
            return d

        def on_ready(self, cb):  # type: ignore[no-untyped-def]
            pass

        on_lost = on_ready

        def startService(self) -> None:
            pass

        def lpush(self, key, values):  # type: ignore[no-untyped-def]
            return self.execute(b"LPUSH", key, *values)

    pending: list = []
    clock = Clock()
    client = ClusterClient(clock, RedisConfig(cluster=(("n", 1),)), lambda node: lambda seconds: None,
                           node_factory=lambda address: Node())  # type: ignore[arg-type,return-value]
    client.startService()
    client._apply([(0, 5460, ("n", 1)), (5461, 10922, ("n", 2)), (10923, 16383, ("n", 3))])
    values = [b"x" * 200] * 10
    keys = [b"list-%d" % i for i in range(3)]
    direct = Node()
    timings = []
    for target in (direct, client):
        started = time.perf_counter()
        for i in range(ROUTING_CALLS):
            target.lpush(keys[i % 3], values)
            if len(pending) == 8:  # replies arrive while a few commands are in flight
                for d in pending:
                    d.callback(10)
                pending.clear()
        timings.append((time.perf_counter() - started) / ROUTING_CALLS * 1e6)
    return timings[0], timings[1]


SINGLE, SPREAD, SAME = "1 Redis", "cluster, 3 primaries", "cluster, 3 lists on one primary"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="relayd-clusterbench-")
    rows: list[dict] = []
    load = os.getloadavg()[0]
    redises: list[Redis] = []
    setups: list[Setup] = []
    try:
        redises = [Redis(workdir, 1), Redis(workdir, 3)]
        setups = [Setup(SINGLE, workdir, redises[0]), Setup(SPREAD, workdir, redises[1]),
                  Setup(SAME, workdir, redises[1], spread=False)]
        for i in range(args.rounds):
            for setup in setups if i % 2 == 0 else list(reversed(setups)):
                rows.append({"round": i + 1, **setup.run(args.seconds)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        for setup in setups:
            setup.stop()
        for redis in redises:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    end_load = os.getloadavg()[0]
    direct_us, cluster_us = routing_overhead()

    def per_round(key: str, target: str) -> list[float]:
        by_round = {r["round"]: r for r in rows if r["target"] == target}
        base = {r["round"]: r for r in rows if r["target"] == SINGLE}
        return [by_round[i][key] / base[i][key] for i in sorted(by_round)]

    def median(key: str, target: str) -> float:
        return statistics.median(r[key] for r in rows if r["target"] == target)

    spread_ratios, same_ratios = per_round("msgs_per_s", SPREAD), per_round("msgs_per_s", SAME)
    print(f"### 1 Redis vs 3 primaries, one relayd core (bench/cluster_bench.py, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load:.1f} at start, "
          f"{end_load:.1f} at the end)\n")
    print(f"relayd on core 0; wrk (-t1 -c{CONNECTIONS}, NDJSON 1000 x ~200 B lines per request, ack=stored, round-robin over "
          f"3 routes) and every redis-server on core 1; {args.rounds} rounds of {args.seconds} s runs, alternating "
          "A B C / C B A.\n")
    print("| round | target | msgs/s | ack p50 | ack p99 | non-2xx | relayd CPU s / M msgs | Redis CPU s / M msgs | spilled |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['round']} | {r['target']} | {r['msgs_per_s']:,.0f} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
              f"{r['non2xx']} | {r['relayd_cpu_per_M']:.2f} | {r['redis_cpu_per_M']:.2f} | {r['spilled']:.0f} |")
    cpu1, cpu3, cpu_same = (median("relayd_cpu_per_M", t) for t in (SINGLE, SPREAD, SAME))
    rcpu1, rcpu3, rcpu_same = (median("redis_cpu_per_M", t) for t in (SINGLE, SPREAD, SAME))
    print(f"\nPer-round throughput ratio, cluster (lists spread) / 1 Redis: "
          f"{', '.join(f'{x:.2f}' for x in spread_ratios)}; **median {statistics.median(spread_ratios):.2f}x** "
          f"(target >= 0.9x).  Control, cluster with the 3 lists on one primary / 1 Redis: "
          f"{', '.join(f'{x:.2f}' for x in same_ratios)}; median {statistics.median(same_ratios):.2f}x.")
    print(f"\nMedian CPU seconds per million messages: relayd {cpu1:.2f} (1 Redis), {cpu3:.2f} (cluster, spread), "
          f"{cpu_same:.2f} (cluster, one primary); Redis (all nodes of the setup) {rcpu1:.2f}, {rcpu3:.2f}, "
          f"{rcpu_same:.2f}.  Median msgs/s: {median('msgs_per_s', SINGLE):,.0f}, {median('msgs_per_s', SPREAD):,.0f}, "
          f"{median('msgs_per_s', SAME):,.0f}.")
    print(f"\nRouting micro-benchmark (in-process, stub nodes, {ROUTING_CALLS:,} LPUSH calls of 10 values): "
          f"straight to a node {direct_us:.2f} µs per command, through ClusterClient {cluster_us:.2f} µs: "
          f"the cluster layer adds {cluster_us - direct_us:.2f} µs per command "
          f"({(cluster_us - direct_us) / LINES * 1000:.2f} ns per message at {LINES} messages per LPUSH).")


if __name__ == "__main__":
    sys.exit(main())
