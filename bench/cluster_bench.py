#!/usr/bin/env python3
"""One relayd core writing NDJSON into 1 Redis vs a 3-primary Redis Cluster.

The question (issue 15): does the cluster layer (slot routing, one
connection per primary, MOVED/ASK bookkeeping) cost relayd throughput per
core?  Target: the cluster figure is >= 0.9x the single-Redis one.

One run, same machine, alternating A/B rounds so drift in the machine's
load hits both sides alike:

- A: relayd -> one ``redis-server``;
- B: relayd -> a cluster of 3 primaries (no replicas: replicas would add
  Redis CPU on this 2-core box without changing relayd's work), with three
  routes whose lists sit on the three primaries.

In both, relayd runs alone on core 0 (``taskset -c 0``), wrk and Redis on
core 1; wrk (-t1 -c50) posts NDJSON batches of 1000 ~200-byte lines,
``ack = "stored"``, round-robin over the routes (bench/ndjson_paths.lua).
Reported per round: messages/s, ack latency p50/p99, and CPU seconds per
million messages of relayd and of Redis (all nodes together), from
/proc/<pid>/stat.  Every run checks that Redis holds at least what was
acknowledged.

Usage: ``python bench/cluster_bench.py [--seconds 10] [--rounds 2]``; prints
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


def one_round(workdir: str, primaries: int, seconds: int, spread: bool = True) -> dict:
    redis = Redis(workdir, primaries)
    try:
        lists = redis.lists(spread)
        relayd = Relayd(workdir, redis, lists)
        try:
            wrk(relayd.port, [f"/{n}" for n in lists], 2)  # warm-up (JIT-free, but caches and connections)
            before = (cpu_seconds(relayd.proc.pid), redis.cpu(), redis.llen_total(lists))
            d = wrk(relayd.port, [f"/{n}" for n in lists], seconds)
            ok = d["requests"] - d["err_status"]
            messages = ok * LINES
            wait_until(lambda: redis.llen_total(lists) - before[2] >= messages, 60, "acked messages in Redis")
            after = (cpu_seconds(relayd.proc.pid), redis.cpu())
            spilled = relayd.spilled()
        finally:
            relayd.stop()
    finally:
        redis.stop()
    secs = d["duration_us"] / 1e6
    return {
        "primaries": primaries,
        "target": "1 Redis" if primaries == 1 else f"cluster, {primaries} primaries" + ("" if spread else ", all 3 lists on one"),
        "msgs_per_s": messages / secs,
        "p50_ms": d["lat_p50_us"] / 1000,
        "p99_ms": d["lat_p99_us"] / 1000,
        "non2xx": d["err_status"],
        "relayd_cpu_per_M": (after[0] - before[0]) / messages * 1e6 if messages else float("nan"),
        "redis_cpu_per_M": (after[1] - before[1]) / messages * 1e6 if messages else float("nan"),
        "spilled": spilled,
    }


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="relayd-clusterbench-")
    rows = []
    load = os.getloadavg()[0]
    try:
        for _ in range(args.rounds):
            # The third target is a control: the cluster client with one busy
            # primary, to tell the client's cost from that of 3 Redis processes.
            for primaries, spread in ((1, True), (3, True), (3, False)):
                rows.append(one_round(workdir, primaries, args.seconds, spread))
                print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    direct_us, cluster_us = routing_overhead()
    def median(key: str, target: str) -> float:
        return statistics.median(r[key] for r in rows if r["target"] == target)

    spread_t, same_t = "cluster, 3 primaries", "cluster, 3 primaries, all 3 lists on one"
    single, cluster, same = (median("msgs_per_s", t) for t in ("1 Redis", spread_t, same_t))
    print(f"### 1 Redis vs 3 primaries, one relayd core (bench/cluster_bench.py, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load:.1f} at start)\n")
    print(f"relayd on core 0; wrk (-t1 -c{CONNECTIONS}, NDJSON 1000 x ~200 B lines per request, ack=stored, round-robin over "
          "3 routes) and every redis-server on core 1.\n")
    print("| round | target | msgs/s | ack p50 | ack p99 | non-2xx | relayd CPU s / M msgs | Redis CPU s / M msgs | spilled |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        print(f"| {i // 3 + 1} | {r['target']} | {r['msgs_per_s']:,.0f} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
              f"{r['non2xx']} | {r['relayd_cpu_per_M']:.2f} | {r['redis_cpu_per_M']:.2f} | {r['spilled']:.0f} |")
    cpu1, cpu3, cpu_same = (median("relayd_cpu_per_M", t) for t in ("1 Redis", spread_t, same_t))
    print(f"\nMedian msgs/s: 1 Redis {single:,.0f}; cluster, lists spread {cluster:,.0f} (**{cluster / single:.2f}x**, "
          f"target >= 0.9x); cluster, lists on one primary {same:,.0f} ({same / single:.2f}x).  Median relayd CPU "
          f"per million messages: {cpu1:.2f} s; {cpu3:.2f} s ({cpu1 / cpu3:.2f}x messages per CPU-second); "
          f"{cpu_same:.2f} s ({cpu1 / cpu_same:.2f}x).")
    print(f"\nRouting micro-benchmark (in-process, stub nodes, {ROUTING_CALLS:,} LPUSH calls of 10 values): "
          f"straight to a node {direct_us:.2f} µs per command, through ClusterClient {cluster_us:.2f} µs: "
          f"the cluster layer adds {cluster_us - direct_us:.2f} µs per command "
          f"({(cluster_us - direct_us) / LINES * 1000:.2f} ns per message at {LINES} messages per LPUSH).")


if __name__ == "__main__":
    sys.exit(main())
