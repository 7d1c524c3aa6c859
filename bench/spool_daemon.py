#!/usr/bin/env python3
"""Spill and replay throughput of the whole daemon (not just the segment log).

One run, on this machine, relayd pinned to core 0 and wrk to core 1:

1. spill, single messages: Redis is down (its port is closed), so every
   ``ack = "stored"`` POST is answered only after its spool record was
   fsynced (``fsync = "batch"``, group commit): wrk -c50 -d10s reports req/s
   and ack latency;
2. spill, NDJSON batches of 1000 lines: msgs/s and MB/s into the spool;
3. replay: SIGTERM, start Redis, start relayd again with ~TARGET records in
   its spool; time from start to LLEN == spooled count gives the replay rate.

Usage: ``python bench/spool_daemon.py [--records 1000000]``; prints a
markdown section for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
TWISTD = os.path.join(ROOT, ".venv", "bin", "twistd")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_until(cond, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def metrics(admin_port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("relayd_") and " " in line and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def redis_cmd(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True).stdout.strip()


class Relayd:
    def __init__(self, workdir: str, redis_port: int) -> None:
        self.port, self.admin = free_port(), free_port()
        self.conf = os.path.join(workdir, "relayd.conf")
        with open(self.conf, "w") as f:
            f.write(
                f'[server]\nlisten = "tcp:{self.port}:interface=127.0.0.1:backlog=1024"\n'
                f'admin = "tcp:{self.admin}:interface=127.0.0.1"\n'
                f'[redis]\nurl = "redis://127.0.0.1:{redis_port}/0"\nreply_timeout = 2.0\n'
                f'[spool]\ndir = "{workdir}/spool"\nmax_bytes = "4GiB"\nfsync = "batch"\n'
                '[buffer]\nack_timeout = 30.0\n'
                '[[route]]\npath = "/leads"\nlist = "leads"\nack = "stored"\nmax_lines = 1000\n'
            )
        self.log = open(os.path.join(workdir, "relayd.log"), "ab")
        self.proc = None

    def start(self) -> float:
        env = dict(os.environ, PYTHONPATH=ROOT)
        started = time.monotonic()
        self.proc = subprocess.Popen(
            ["taskset", "-c", "0", TWISTD, "-n", "--pidfile=", "relayd", "--config", self.conf],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(self.conf),
        )

        def ready():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/healthz", timeout=1).status == 200
            except OSError:
                return False

        wait_until(ready, 60, "relayd")
        return started

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def wrk(url: str, script: str, seconds: int) -> dict:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c50", f"-d{seconds}s", "--latency", "-s", script, url],
        capture_output=True, text=True, env=dict(os.environ, WRK_STATUS_HOOK="1"),
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("BENCHJSON "))
    data = json.loads(line[len("BENCHJSON "):])

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if not m:
            return None
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1000.0}[m.group(2)]

    data["p50_ms"], data["p99_ms"] = pct(50), pct(99)
    return data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="relayd-spoolbench-")
    redis_port = free_port()
    relayd = Relayd(workdir, redis_port)
    rows = []
    try:
        relayd.start()
        url = f"http://127.0.0.1:{relayd.port}/leads"
        single = wrk(url, os.path.join(BENCH, "post.lua"), args.seconds)
        rows.append(("spill, single POST, ack=stored, fsync=batch", single, 1))
        batch = wrk(url, os.path.join(BENCH, "ndjson.lua"), args.seconds)
        rows.append(("spill, NDJSON 1000 lines/request, ack=stored, fsync=batch", batch, 1000))
        # Top up to the target record count with more batches.
        spooled = metrics(relayd.admin).get("relayd_spool_messages", 0)
        while spooled < args.records:
            top_up = wrk(url, os.path.join(BENCH, "ndjson.lua"), 5)
            if top_up["err_status"] or top_up["requests"] == 0:
                raise SystemExit(f"spill refused requests while filling the spool: {top_up}")
            spooled = metrics(relayd.admin).get("relayd_spool_messages", 0)
        spool_bytes = metrics(relayd.admin).get("relayd_spool_bytes", 0)
        code = relayd.stop()
        redis = subprocess.Popen(
            ["taskset", "-c", "1", "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: redis_cmd(redis_port, "PING") == "PONG", 10, "redis")
        started = relayd.start()
        wait_until(lambda: int(redis_cmd(redis_port, "LLEN", "leads") or 0) >= spooled, 600, "replay", 0.02)
        replay_s = time.monotonic() - started
        relayd.stop()
        redis.terminate()
        redis.wait()
    finally:
        if relayd.proc and relayd.proc.poll() is None:
            relayd.proc.kill()
    print(f"## Spill and replay (bench/spool_daemon.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
    print("relayd on core 0, wrk (-t1 -c50) on core 1, Redis down during the spill phases; "
          "`[spool] fsync = \"batch\"` (group commit, 2 ms window), ~200 B JSON per message.\n")
    print("| phase | req/s | msgs/s | MB/s (payload) | ack p50 | ack p99 | non-2xx |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, d, lines in rows:
        secs = d["duration_us"] / 1e6
        ok = d["requests"] - d["err_status"]
        print(f"| {name} | {ok / secs:,.0f} | {ok * lines / secs:,.0f} | {ok * lines * 200 / secs / 1e6:.1f} | "
              f"{d['p50_ms']:.2f} ms | {d['p99_ms']:.2f} ms | {d['err_status']} |")
    print(f"\nReplay after a restart: {int(spooled):,} spooled messages ({spool_bytes / 1e6:,.0f} MB payload) "
          f"reached Redis {replay_s:.1f} s after relayd was started (start-up scan and recovery included): "
          f"**{spooled / replay_s:,.0f} msgs/s**. (stop exit status {code})")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
