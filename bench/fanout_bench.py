#!/usr/bin/env python3
"""Fan-out benchmark: SSE subscribers of stream routes under a seed-like load, 1 worker.

    .venv/bin/python bench/fanout_bench.py [--teams 200] [--subs 10] [--rates 200,400,800] [--duration 15]

Per row: a fresh redis-server and ``twistd -n relayd`` (workers = 1) pinned
to core 0, the load generator (bench/fanout_load.py, asyncio) pinned to
core 1.  The generator opens TEAMS x SUBS subscriptions, then POSTs RATE/s
spread over the teams; it reports POST-ack-to-subscriber latency (the time
from the POST's 2xx at the client to the event at each subscriber), events
received vs expected, and its own CPU share (well under 1.0 = it was not
the limit).  relayd's CPU share and peak RSS come from /proc.

Reference in the same run: the same POST rate to a list-only route with
no subscribers (ingest alone), so the fan-out's CPU cost is a ratio to
plain ingest measured on the same box at the same time.

``--compare DIR`` runs a stream row of another checkout's relayd before
each of ours (interleaved before/after on the same noisy box); each row
also records Redis's ``INFO commandstats`` (calls, usec per call), and
``--profile FILE`` runs relayd under cProfile.

The seed's load (1,000 teams x 10 subscribers, 2,000 POSTs/s = 20,000
events/s) is the target; on a shared 2-core VM the defaults are scaled
down (see docs/benchmarks.md for what was run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.harness import RespClient, free_port, to_toml, twistd_command  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")


def commandstats(r: RespClient) -> dict:
    """``INFO commandstats`` as {command: {calls, usec_per_call}} for the commands fan-out uses."""
    stats = {}
    for line in r.command("INFO", "commandstats").decode().splitlines():
        if not line.startswith("cmdstat_"):
            continue
        name, rest = line[len("cmdstat_"):].split(":", 1)
        fields = dict(kv.split("=", 1) for kv in rest.split(","))
        if int(fields["calls"]) >= 10:
            stats[name] = {"calls": int(fields["calls"]), "usec_per_call": float(fields["usec_per_call"]),
                           "usec": int(fields["usec"])}
    return stats


def run_row(
    teams: int, subs: int, rate: int, duration: float, stream: bool, profile: str = "", tree: str = ROOT, label: str = ""
) -> dict:
    work = tempfile.mkdtemp(prefix="fanout-bench-")
    procs = []
    try:
        rport, iport, aport = free_port(), free_port(), free_port()
        redis = subprocess.Popen(
            ["taskset", "-c", "0", "redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, cwd=work,
        )
        procs.append(redis)
        wait_port(rport)
        route = {"path": "/tracking/{team}", "history": 100} if stream else {"path": "/tracking/{team}"}
        if stream:
            route["stream"] = "tracking:{team}"
        else:
            route["list"] = "tracking:{team}"
        tables = {
            "server": {"listen": f"tcp:{iport}:interface=127.0.0.1", "admin": f"tcp:{aport}:interface=127.0.0.1",
                       "workers": 1},
            "redis": {"url": f"redis://127.0.0.1:{rport}/0"},
            "spool": {"dir": os.path.join(work, "spool")},
            "limits": {"max_connections": 60000, "max_connections_per_peer": 60000},
        }
        conf = os.path.join(work, "relayd.conf")
        with open(conf, "w") as f:
            f.write(to_toml(tables, [route]))
        env = dict(os.environ, PYTHONPATH=tree)
        relayd = subprocess.Popen(
            ["taskset", "-c", "0", *twistd_command(), "-n", "--pidfile=",
             *(["--profile", profile, "--profiler", "cprofile", "--savestats"] if profile else []),
             "relayd", "--config", conf],
            cwd=work, env=env, stdout=open(os.path.join(work, "relayd.log"), "wb"), stderr=subprocess.STDOUT,
        )
        procs.append(relayd)
        wait_port(iport)
        time.sleep(1.0)
        gen = subprocess.Popen(
            ["taskset", "-c", "1", sys.executable, os.path.join(HERE, "fanout_load.py"),
             str(iport), str(teams), str(subs if stream else 0), str(rate), str(duration), "32"],
            stdout=subprocess.PIPE, text=True,
        )
        procs.append(gen)
        assert gen.stdout is not None
        lines = []
        cpu0 = t0 = cpu1 = t1 = 0.0
        for line in gen.stdout:
            if line.strip() == "posting":
                cpu0, t0 = cpu_seconds(relayd.pid), time.monotonic()
            elif line.strip() == "posted":
                cpu1, t1 = cpu_seconds(relayd.pid), time.monotonic()
            else:
                lines.append(line)
        if gen.wait() != 0 or not lines:
            raise RuntimeError("load generator failed")
        result = json.loads(lines[-1])
        result.update(
            teams=teams, subs=subs if stream else 0, rate=rate,
            route=("stream" + (f" ({label})" if label else "")) if stream else "list (reference)",
            relayd_cpu_share=round((cpu1 - cpu0) / (t1 - t0), 3),
            relayd_peak_rss_mib=round(peak_rss_mib(relayd.pid), 1),
        )
        with RespClient("127.0.0.1", rport) as r:
            result["redis_used_memory_mib"] = round(int(dict(
                line.split(":", 1) for line in r.command("INFO", "memory").decode().splitlines() if ":" in line
            )["used_memory"]) / 2**20, 1)
            result["redis_commandstats"] = commandstats(r)
        return result
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teams", type=int, default=200)
    parser.add_argument("--subs", type=int, default=10)
    parser.add_argument("--rates", default="200,400,800")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--no-reference", action="store_true", help="skip the list-only reference rows (profiling runs)")
    parser.add_argument("--profile", default="", help="cProfile relayd of the stream rows into this file (pstats)")
    parser.add_argument(
        "--compare", default="",
        help="another checkout (e.g. `git archive <commit>` unpacked): its relayd runs a stream row before ours, alternately",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (reference, [compare,] stream) per rate")
    args = parser.parse_args()
    args.profile = os.path.abspath(args.profile) if args.profile else ""
    rows = []
    for rate in (int(r) for r in args.rates.split(",")):
        for _ in range(args.rounds):
            if not args.no_reference:
                rows.append(run_row(args.teams, args.subs, rate, args.duration, stream=False))
                print(json.dumps(rows[-1]), flush=True)
            if args.compare:
                tree = os.path.abspath(args.compare)
                rows.append(run_row(args.teams, args.subs, rate, args.duration, stream=True, tree=tree, label="before"))
                print(json.dumps(rows[-1]), flush=True)
            rows.append(run_row(args.teams, args.subs, rate, args.duration, stream=True, profile=args.profile,
                                label="after" if args.compare else ""))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print("| route | teams x subs | POSTs/s | events/s out | p50 / p99 / max ack->sub (ms) | relayd CPU | relayd peak RSS | generator CPU | events recv/expected |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['route']} | {r['teams']} x {r['subs']} | {r['posts_acked'] / r['post_seconds']:.0f} | {r['events_per_s']:.0f} "
            f"| {r['ack_to_sub_p50_ms']} / {r['ack_to_sub_p99_ms']} / {r['ack_to_sub_max_ms']} | {r['relayd_cpu_share']:.0%} "
            f"| {r['relayd_peak_rss_mib']} MiB | {r['generator_cpu_share']:.0%} | {r['events_received']}/{r['events_expected']} |"
        )
    print()
    print("Redis commandstats (calls, usec_per_call) per row:")
    for r in rows:
        stats = r.get("redis_commandstats", {})
        print(f"- {r['route']} {r['posts_acked'] / r['post_seconds']:.0f} POSTs/s: " + ", ".join(
            f"{name} {v['calls']} x {v['usec_per_call']} us" for name, v in sorted(stats.items())
        ))


if __name__ == "__main__":
    main()
