"""Delivery throughput and latency: relayd ``[[deliver]]`` vs a naive consumer, same run.

Usage: ``.venv/bin/python bench/deliver_bench.py [--messages N] [--concurrency C]``
(needs redis-server on PATH and bench/requirements.txt installed).

1. Throughput: N envelopes are LPUSHed at once; each consumer drains them
   into the same local upstream (bench/deliver_upstream_fast.py, 200 at
   once).  Reported: deliveries/s by wall clock and per CPU-second of the
   consumer process (utime + stime from /proc: "per core"), and the ratio
   relayd / naive (redis-py BRPOP + requests.Session, bench/deliver_naive.py).
2. Latency: a producer pushes envelopes at half relayd's measured
   throughput for a few seconds (no ``rate`` limit: the offered load is the
   limit); the upstream records now - the body's enqueue time; p50/p99.
3. Rate accuracy: a backlog drained with ``rate`` = half the throughput;
   the achieved rate over the run (the global limiter's cost shows here).

A shared, noisy machine moves every absolute figure; the ratio of two
consumers measured in the same run is what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Dict, List

import redis

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A free TCP port on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait(cond: Any, timeout: float, what: str) -> None:
    """Poll `cond` until true or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.02)


def stats(port: int, path: str = "/stats") -> Dict[str, Any]:
    """The upstream's counters."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        data = r.read()
    return json.loads(data) if path == "/stats" else {}


def envelope(i: int, t0: float = 0.0) -> bytes:
    """A ~200-byte relayd envelope."""
    body: Dict[str, Any] = {"email": f"user{i}@example.com", "source": "bench", "n": i}
    if t0:
        body["t0"] = t0
    return json.dumps(
        {"id": f"b{i:09d}", "ts": t0 or time.time(), "route": "/in", "content_type": "application/json", "body": body}
    ).encode()


def fill(r: redis.Redis, key: str, n: int) -> None:
    """LPUSH n envelopes in pipelined batches."""
    pipe = r.pipeline(transaction=False)
    for start in range(0, n, 1000):
        pipe.lpush(key, *[envelope(i) for i in range(start, min(n, start + 1000))])
    pipe.execute()


def relayd_config(tmp: str, redis_port: int, upstream: int, concurrency: int, rate: str = "") -> str:
    """A relayd config with one route and one deliver."""
    text = f"""
[server]
listen = "tcp:{free_port()}:interface=127.0.0.1"
admin = "tcp:{free_port()}:interface=127.0.0.1"
[redis]
url = "redis://127.0.0.1:{redis_port}/0"
[spool]
dir = "{tmp}/spool"
[[route]]
path = "/in"
list = "unused"
[[deliver]]
name = "bench"
list = "leads"
url = "http://127.0.0.1:{upstream}/hook"
concurrency = {concurrency}
"""
    if rate:
        text += f'rate = "{rate}"\n'
    path = os.path.join(tmp, "relayd.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


def start_relayd(tmp: str, config: str) -> subprocess.Popen:
    """twistd -n relayd with `config`."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(os.path.join(tmp, "relayd.log"), "ab")  # noqa: SIM115 - child's lifetime
    return subprocess.Popen(
        [sys.executable, twistd, "-n", "--pidfile=", "relayd", "--config", config], cwd=tmp, env=env,
        stdout=log, stderr=log,
    )


def drained(r: redis.Redis) -> bool:
    """The list and every processing list are empty."""
    if r.llen("leads"):
        return False
    return all(r.llen(k) == 0 for k in r.keys("{leads}:processing:*"))


def run_relayd(tmp: str, r: redis.Redis, rport: int, uport: int, n: int, concurrency: int) -> Dict[str, float]:
    """relayd drains n messages; wall-clock and CPU rates."""
    proc = start_relayd(tmp, relayd_config(tmp, rport, uport, concurrency))
    try:
        wait(lambda: r.scard("{leads}:consumers:bench") > 0, 60, "relayd to register")
        time.sleep(0.5)
        stats(uport, "/reset")
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        fill(r, "leads", n)
        wait(lambda: stats(uport)["count"] >= n, 600, "relayd to deliver everything")
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(proc.pid) - cpu0
        wait(lambda: drained(r), 60, "relayd to settle")
        return {"wall_per_s": n / elapsed, "per_cpu_s": n / cpu, "cpu_share": cpu / elapsed, "seconds": elapsed}
    finally:
        proc.terminate()
        proc.wait(60)


def run_naive(r: redis.Redis, rport: int, uport: int, n: int) -> Dict[str, float]:
    """The naive consumer drains n messages."""
    fill(r, "naive", n)
    stats(uport, "/reset")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "deliver_naive.py"), str(rport), "naive", f"http://127.0.0.1:{uport}/hook", str(n)]
    )
    cpu = 0.0
    while proc.poll() is None:  # sample CPU until it exits (the /proc entry goes with it)
        try:
            cpu = cpu_seconds(proc.pid)
        except (OSError, IndexError):
            pass
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0 or stats(uport)["count"] < n:
        raise SystemExit("bench: the naive consumer failed")
    return {"wall_per_s": n / elapsed, "per_cpu_s": n / max(cpu, 1e-6), "cpu_share": cpu / elapsed, "seconds": elapsed}


def run_rate(tmp: str, r: redis.Redis, rport: int, uport: int, rate: int, seconds: float, concurrency: int) -> Dict[str, float]:
    """A backlog drained under ``rate``: the achieved rate."""
    n = int(rate * seconds)
    proc = start_relayd(tmp, relayd_config(tmp, rport, uport, concurrency, rate=f"{rate}/s"))
    try:
        wait(lambda: r.scard("{leads}:consumers:bench") > 0, 60, "relayd to register")
        time.sleep(0.5)
        stats(uport, "/reset")
        fill(r, "leads", n)
        t0 = time.monotonic()
        wait(lambda: stats(uport)["count"] >= n, 600, "the rate run to finish")
        return {"configured": rate, "achieved": n / (time.monotonic() - t0)}
    finally:
        proc.terminate()
        proc.wait(60)


def run_latency(tmp: str, r: redis.Redis, rport: int, uport: int, rate: float, seconds: float, concurrency: int) -> Dict[str, float]:
    """Messages offered at `rate`/s; enqueue-to-upstream latency percentiles."""
    proc = start_relayd(tmp, relayd_config(tmp, rport, uport, concurrency))
    try:
        wait(lambda: r.scard("{leads}:consumers:bench") > 0, 60, "relayd to register")
        time.sleep(0.5)
        stats(uport, "/reset")
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < seconds:
            due = start + i / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            r.lpush("leads", envelope(i, t0=time.time()))
            i += 1
        wait(lambda: stats(uport)["count"] >= i, 120, "the latency run to finish")
        lat: List[float] = sorted(stats(uport)["latencies"])
        return {
            "rate": rate,
            "messages": i,
            "p50_ms": lat[len(lat) // 2] * 1000,
            "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000,
        }
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    """Run the three measurements and print a JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="deliver-bench-")
    rport, uport = free_port(), free_port()
    procs = [
        subprocess.Popen(
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        ),
        subprocess.Popen([sys.executable, os.path.join(HERE, "deliver_upstream_fast.py"), str(uport)]),
    ]
    try:
        r = redis.Redis(port=rport)
        wait(lambda: _ping(r), 10, "redis")
        wait(lambda: _connects(uport), 10, "upstream")
        relayd = run_relayd(tmp, r, rport, uport, args.messages, args.concurrency)
        naive = run_naive(r, rport, uport, args.messages)
        latency = run_latency(
            tmp, r, rport, uport, relayd["wall_per_s"] / 2, args.latency_seconds, args.concurrency
        )
        rate = run_rate(tmp, r, rport, uport, int(relayd["wall_per_s"] / 2), args.latency_seconds, args.concurrency)
        report = {
            "messages": args.messages,
            "concurrency": args.concurrency,
            "cpus": os.cpu_count(),
            "relayd": relayd,
            "naive": naive,
            "ratio_wall": relayd["wall_per_s"] / naive["wall_per_s"],
            "ratio_per_cpu": relayd["per_cpu_s"] / naive["per_cpu_s"],
            "latency_at_half_rate": latency,
            "global_rate": rate,
        }
        print(json.dumps(report, indent=2))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _ping(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.ConnectionError:
        return False


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
