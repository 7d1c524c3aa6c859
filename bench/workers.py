#!/usr/bin/env python3
"""Throughput with 1 vs 2 worker processes, and the supervisor's overhead.

    .venv/bin/python bench/workers.py [--duration 10] [--connections 64] [--append-docs]

For each of workers = 1 and workers = 2 (ack = "stored" and "accepted"):
a fresh redis-server and relayd (``twistd -n relayd``) on free ports, a 3 s
wrk warm-up, then ``wrk -t2 -cC -dDs`` with bench/post.lua (~200 B JSON
POSTs, keep-alive).  No CPU pinning: on a 2-core box the load generator,
Redis and relayd share both cores, which is the point (it shows what a
second reactor buys when the cores are contended).  Also recorded: the
supervisor's CPU seconds during the measured run (it only forwards nothing:
its cost is heartbeats and the /metrics scrape), the time of one merged
/metrics scrape, and LLEN vs acknowledged requests (nothing lost).

Results go to bench/results/workers-<timestamp>/ and, with --append-docs,
to the "Workers" section at the end of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.harness import RespClient, to_toml, twistd_command  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError("timed out")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def run_one(workers: int, ack: str, duration: int, connections: int, outdir: str) -> dict:
    tmp = tempfile.mkdtemp(prefix="relayd-bench-")
    rport, iport, aport = free_port(), free_port(), free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp,
    )
    relayd = None
    try:
        wait(lambda: RespClient("127.0.0.1", rport).command("PING") == "PONG")
        conf = os.path.join(tmp, "relayd.conf")
        with open(conf, "w") as f:
            f.write(
                to_toml(
                    {
                        "server": {
                            "listen": f"tcp:{iport}:interface=127.0.0.1:backlog=1024",
                            "admin": f"tcp:{aport}:interface=127.0.0.1",
                            "workers": workers,
                        },
                        "redis": {"url": f"redis://127.0.0.1:{rport}/0"},
                        "spool": {"dir": os.path.join(tmp, "spool")},
                    },
                    [{"path": "/leads", "list": "leads", "ack": ack}],
                )
            )
        env = dict(os.environ, PYTHONPATH=ROOT)
        log = open(os.path.join(outdir, f"relayd-w{workers}-{ack}.log"), "wb")
        relayd = subprocess.Popen(
            twistd_command() + ["-n", "--pidfile=", "relayd", "--config", conf], cwd=tmp, env=env, stdout=log, stderr=log
        )
        wait(lambda: urllib.request.urlopen(f"http://127.0.0.1:{aport}/readyz", timeout=2).status == 200)
        url = f"http://127.0.0.1:{iport}/leads"
        wrk = ["wrk", "-t2", f"-c{connections}", "--latency", "-s", os.path.join(HERE, "post.lua"), url]
        subprocess.run(wrk[:1] + ["-d3s"] + wrk[1:], capture_output=True, check=True)
        sup_cpu0 = cpu_seconds(relayd.pid)
        out = subprocess.run(wrk[:1] + [f"-d{duration}s"] + wrk[1:], capture_output=True, text=True, check=True).stdout
        sup_cpu = cpu_seconds(relayd.pid) - sup_cpu0
        with open(os.path.join(outdir, f"wrk-w{workers}-{ack}.txt"), "w") as f:
            f.write(out)
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        p99 = re.search(r"99%\s+([\d.]+\w+)", out).group(1)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        started = time.monotonic()
        urllib.request.urlopen(f"http://127.0.0.1:{aport}/metrics", timeout=5).read()
        scrape_ms = (time.monotonic() - started) * 1000
        pids = children(relayd.pid)
        relayd.send_signal(signal.SIGTERM)
        code = relayd.wait(60)
        llen = RespClient("127.0.0.1", rport).command("LLEN", "leads")
        return {
            "workers": workers,
            "ack": ack,
            "rps": rps,
            "p99": p99,
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "supervisor_cpu_pct": 100 * sup_cpu / duration if workers > 1 else None,
            "scrape_ms": scrape_ms,
            "processes": 1 + len(pids) if workers > 1 else 1,
            "exit": code,
            "llen": llen,
        }
    finally:
        if relayd is not None and relayd.poll() is None:
            relayd.kill()
        redis.kill()
        redis.wait()
        shutil.rmtree(tmp, True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--append-docs", action="store_true")
    args = p.parse_args()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = os.path.join(HERE, "results", f"workers-{stamp}")
    os.makedirs(outdir, exist_ok=True)
    rows = []
    for ack in ("stored", "accepted"):
        for workers in (1, 2):
            row = run_one(workers, ack, args.duration, args.connections, outdir)
            print(row, flush=True)
            rows.append(row)
    table = [
        "| workers | ack | req/s | p99 | non-2xx | supervisor CPU | merged /metrics | exit | LLEN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sup = "n/a (no supervisor)" if r["supervisor_cpu_pct"] is None else f"{r['supervisor_cpu_pct']:.1f} %"
        table.append(
            f"| {r['workers']} | {r['ack']} | {r['rps']:.0f} | {r['p99']} | {r['non2xx']} | {sup} | "
            f"{r['scrape_ms']:.1f} ms | {r['exit']} | {r['llen']} |"
        )
    text = "\n".join(table)
    print(text)
    with open(os.path.join(outdir, "table.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
