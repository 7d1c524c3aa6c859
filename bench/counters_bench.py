"""Counters throughput: end to end, the counting stage alone, and a PostgreSQL flush.

Usage: python bench/counters_bench.py [--seconds S] [--keys K] [--items N] [--json]

1. End to end: ``twistd -n relayd`` (workers = 1, one core) with the
   ``/increments`` route and a ``[[counter]]`` into a hash; wrk posts NDJSON
   batches of 1000 increments over K distinct keys (bench/increments.lua)
   for S seconds; the clock stops when the hash holds every acknowledged
   increment.  Reported: increments/s wall-clock, and per relayd CPU-second
   (= per core; the machine's other core runs wrk and Redis).
2. Counting stage, same process (with relayd's garbage-collector settings),
   same N envelopes in a Redis list, run one after the other: relayd's `Aggregator` (batches of 10k, one Lua apply
   each; with the seen-id dedupe and with ``dedupe_window = 0``) against the seed's design, a consumer doing one ``HINCRBY`` per
   increment (RPOP 1000 at a time, the HINCRBYs pipelined).  Reported as
   increments/s and the ratio.
3. PostgreSQL: one flush (`PostgresSink._apply`: COPY + one upsert) of K
   distinct keys into a private server (initdb on a free port), first as
   inserts, then as updates, alternating with the previous design (unnest of
   array parameters, 10k keys a statement) on fresh tables; wall seconds,
   the server backend's CPU seconds and the client's (relayd's thread).

All on one shared machine: figures are noisy; compare ratios within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from relayd.codec import encode_envelope  # noqa: E402
from tests.harness import RedisServer, RelaydProcess, wait_for  # noqa: E402


class _Cleanup:
    """The two TestCase methods the harness fixtures use."""

    def __init__(self) -> None:
        self.callbacks: List[Any] = []

    def addCleanup(self, fn: Callable[..., Any], *args: Any) -> None:  # noqa: N802 - TestCase's name
        self.callbacks.append((fn, args))

    def run(self) -> None:
        for fn, args in reversed(self.callbacks):
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - best effort teardown
                pass


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu(redis: RedisServer) -> float:
    """Seconds of CPU the redis-server has used (INFO cpu: user + sys)."""
    info = redis.command("INFO", "cpu").decode()
    values = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return float(values["used_cpu_user"]) + float(values["used_cpu_sys"])


def hash_total(redis: RedisServer, key: str) -> int:
    """Sum of a hash's values."""
    with redis.client() as c:
        return sum(int(v) for v in c.command("HVALS", key))


def end_to_end(
    cleanup: _Cleanup, seconds: float, keys: int, profile: str | None = None, schema: bool = False
) -> Dict[str, Any]:
    """wrk -> relayd (ingest + counter) -> hash; `profile`: py-spy raw output file; `schema`: the route
    validates every increment with etc/schemas/increment.json, as etc/relayd.conf's does."""
    redis = RedisServer(cleanup)  # type: ignore[arg-type]
    route: Dict[str, Any] = {"path": "/increments", "list": "increments", "max_body": "4MiB"}
    if schema:
        route["schema"] = os.path.join(ROOT, "etc", "schemas", "increment.json")
    relayd = RelaydProcess(
        cleanup,  # type: ignore[arg-type]
        routes=[route],
        redis_url=redis.url,
        counters=[{"name": "hits", "list": "increments", "hash": "counts:hits", "flush_interval": "1s"}],
        buffer={"max_messages": 400_000, "max_bytes": "256MiB"},
    )
    assert relayd.proc is not None
    spy = None
    if profile:
        spy = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--format", "raw", "-r", "200",
             "-o", profile, "-p", str(relayd.proc.pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # py-spy attaches
    cpu0 = cpu_seconds(relayd.proc.pid)
    t0 = time.perf_counter()
    env = dict(os.environ, KEYS=str(keys), BATCH_LINES="1000")
    out = subprocess.run(
        ["wrk", "-t1", "-c4", f"-d{seconds:g}s", "-s", os.path.join(ROOT, "bench", "increments.lua"),
         f"http://127.0.0.1:{relayd.ingest_port}/increments"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout
    ingest_s = time.perf_counter() - t0
    stats = json.loads(out.split("BENCHJSON", 1)[1].strip().splitlines()[0])
    acked = (stats["requests"] - stats["err_status"]) * 1000
    wait_for(lambda: hash_total(redis, "counts:hits") >= acked, 300, "the hash to hold every acknowledged increment", interval=0.2)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(relayd.proc.pid) - cpu0
    counted = hash_total(redis, "counts:hits")
    fields = int(redis.command("HLEN", "counts:hits"))
    if spy is not None:
        spy.send_signal(2)
        spy.wait(30)
    relayd.terminate()
    return {
        "acked": acked,
        "counted": counted,
        "distinct_keys": fields,
        "ingest_seconds": round(ingest_s, 2),
        "wall_seconds": round(wall, 2),
        "per_second_wall": round(counted / wall),
        "relayd_cpu_seconds": round(cpu, 2),
        "per_cpu_second": round(counted / cpu) if cpu else None,
        "non2xx": stats["err_status"],
        "schema": schema,
    }


def fill(redis: RedisServer, key: str, items: int, keys: int) -> None:
    """LPUSH `items` increment envelopes over `keys` distinct keys, 1000 per command."""
    with redis.client() as c:
        for start in range(0, items, 1000):
            batch = [
                encode_envelope("%030x" % i, time.time(), "/increments", "application/json",
                                {"key": "00000000-0000-4000-8000-%012d" % (i % keys), "value": 1})
                for i in range(start, min(items, start + 1000))
            ]
            c.command("LPUSH", key, *batch)


def counting_stage(cleanup: _Cleanup, items: int, keys: int) -> Dict[str, Any]:
    """relayd's Aggregator vs a per-increment HINCRBY consumer, same items, same process."""
    import gc

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from relayd.config import CounterConfig, RedisConfig
    from relayd.counters.aggregator import Aggregator
    from relayd.ops.gctune import GEN0_THRESHOLD
    from relayd.redis.client import RedisClient

    # relayd's own collector settings (relayd/ops/gctune.py), so the counting path pays what it pays there
    gc.set_threshold(GEN0_THRESHOLD, *gc.get_threshold()[1:])
    gc.freeze()
    redis = RedisServer(cleanup)  # type: ignore[arg-type]
    result: Dict[str, Any] = {"items": items, "keys": keys}

    # the seed's design: one HINCRBY per increment (pipelined per RPOP of 1000)
    fill(redis, "ref", items, keys)
    r0, c0, t0 = redis_cpu(redis), time.process_time(), time.perf_counter()
    with redis.client() as c:
        while True:
            got = c.command("RPOP", "ref", 1000)
            if not got:
                break
            commands = []
            for item in got:
                body = json.loads(item)["body"]
                key = body["key"].encode()
                value = b"%d" % body["value"]
                commands.append(b"*4\r\n$7\r\nHINCRBY\r\n$8\r\nref:hash\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value))
            c._sock.sendall(b"".join(commands))  # pipelined: generous to the reference
            for _ in got:
                c.read_reply()
    ref_wall, ref_cpu, ref_redis = time.perf_counter() - t0, time.process_time() - c0, redis_cpu(redis) - r0
    assert hash_total(redis, "ref:hash") == items

    client = RedisClient(reactor, RedisConfig(port=redis.port, reply_timeout=30.0))
    timing: Dict[str, Any] = {}

    async def run() -> None:
        while not client.ready:
            await Deferred.fromCoroutine(_sleep(reactor, 0.01))
        for label, window in (("dedupe", 900.0), ("no_dedupe", 0.0)):
            hash_key = "counts:" + label
            fill(redis, "increments", items, keys)
            config = CounterConfig(name="hits", list="increments", hash=hash_key, flush_interval=1.0, dedupe_window=window)
            agg = Aggregator(reactor, config, client, b"bench", None)
            r0, c0, t0 = redis_cpu(redis), time.process_time(), time.perf_counter()
            while await agg.run_once():
                pass
            timing[label] = (time.perf_counter() - t0, time.process_time() - c0, redis_cpu(redis) - r0)
            assert hash_total(redis, hash_key) == items, "aggregator miscounted"

    def go() -> None:
        client.startService()
        d = Deferred.fromCoroutine(run())
        d.addErrback(lambda f: (f.printTraceback(), None))
        d.addBoth(lambda _: client.stopService()).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    result.update(
        hincrby_per_second=round(items / ref_wall),
        hincrby_client_cpu_per_item_us=round(ref_cpu / items * 1e6, 2),
        hincrby_redis_cpu_per_item_us=round(ref_redis / items * 1e6, 2),
    )
    for label, (wall, cpu, rcpu) in timing.items():
        result[f"aggregator_{label}_per_second"] = round(items / wall)
        result[f"aggregator_{label}_cpu_per_item_us"] = round(cpu / items * 1e6, 2)
        result[f"aggregator_{label}_redis_cpu_per_item_us"] = round(rcpu / items * 1e6, 2)
        result[f"ratio_{label}_vs_hincrby_wall"] = round(ref_wall / wall, 2)
        result[f"ratio_{label}_vs_hincrby_total_cpu"] = round((ref_cpu + ref_redis) / (cpu + rcpu), 2)
    return result


async def _sleep(reactor: Any, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


def _unnest_apply(cur: Any, table: str, name: str, keys: List[str], values: List[int]) -> None:
    """The previous flush (before COPY), kept as the in-run reference: unnest of
    two array parameters, 10k keys a statement."""
    for i in range(0, len(keys), 10_000):
        cur.execute(
            f"INSERT INTO {table} AS t (name, key, value) "
            f"SELECT %s, k, v FROM unnest(%s::text[], %s::bigint[]) AS u(k, v) "
            f"ON CONFLICT (name, key) DO UPDATE SET value = t.value + EXCLUDED.value",
            (name, keys[i : i + 10_000], values[i : i + 10_000]),
        )


def pg_flush(cleanup: _Cleanup, keys: int, rounds: int = 2) -> Dict[str, Any]:
    """PostgresSink's flush of `keys` distinct keys (inserts, then updates) against
    the previous unnest flush, alternating, each on a fresh table; wall seconds and
    the server backend's CPU seconds (the load-robust figure on a shared box)."""
    import psycopg

    from relayd.counters.pg_sink import PostgresSink, ddl
    from relayd.counters.summary import Summary
    from tests.pg_harness import PostgresServer, available

    if available() is not None:
        return {"skipped": available()}
    pg = PostgresServer(cleanup)  # type: ignore[arg-type]
    sums = {"00000000-0000-4000-8000-%012d" % i: 1 for i in range(keys)}
    sorted_keys = sorted(sums)
    ones = [1] * keys
    out: Dict[str, Any] = {"keys": keys, "rounds": rounds}
    samples: Dict[str, List[float]] = {}
    with psycopg.connect(pg.url) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        for r in range(rounds):
            for design in ("unnest_reference", "copy"):
                table = f"c_{design}_{r}"
                sink = PostgresSink(None, pg.url, "hits", table)  # type: ignore[arg-type]
                for statement in ddl(table):
                    conn.execute(statement)
                conn.commit()
                sink._schema_ready = True
                for phase in ("insert", "update"):
                    c0, t0, p0 = cpu_seconds(backend), time.perf_counter(), time.process_time()
                    with conn.transaction():
                        with conn.cursor() as cur:
                            if design == "copy":
                                sink._apply(cur, [Summary(f"{phase}{r}", 0.0, sums)])
                            else:
                                _unnest_apply(cur, table, "hits", sorted_keys, ones)
                    samples.setdefault(f"{design}_{phase}_seconds", []).append(round(time.perf_counter() - t0, 3))
                    samples.setdefault(f"{design}_{phase}_pg_cpu_seconds", []).append(round(cpu_seconds(backend) - c0, 2))
                    samples.setdefault(f"{design}_{phase}_client_cpu_seconds", []).append(round(time.process_time() - p0, 3))
                total = conn.execute(f"SELECT sum(value) FROM {table}").fetchone()[0]  # type: ignore[index]
                assert total == 2 * keys, (design, total)
    out.update(samples)
    return out


def main() -> None:
    """Run all three and print a report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--json", action="store_true")
    p.add_argument("--only", choices=["e2e", "stage", "pg"])
    p.add_argument("--profile", help="py-spy raw profile of relayd during the end-to-end run, to this file")
    p.add_argument("--schema", action="store_true",
                   help="end to end: the route validates with etc/schemas/increment.json (uuid key, value >= 1)")
    args = p.parse_args()
    cleanup = _Cleanup()
    tempfile.tempdir = tempfile.gettempdir()
    report: Dict[str, Any] = {"load": os.getloadavg()[0]}
    try:
        if args.only in (None, "stage"):
            report["counting_stage"] = counting_stage(cleanup, args.items, args.keys)
        if args.only in (None, "pg"):
            report["postgres_flush"] = pg_flush(cleanup, args.keys)
        if args.only in (None, "e2e"):
            report["end_to_end"] = end_to_end(cleanup, args.seconds, args.keys, args.profile, args.schema)
    finally:
        cleanup.run()
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
