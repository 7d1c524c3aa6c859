"""A/B: the raw twisted.web reference with twisted.web's parser vs llhttp.

Issue 13, item 3: keep llhttp only if the raw path gains >= 1.25x.  Runs
``bench/ref_twisted_web.py`` pinned to one core (``taskset -c SERVER_CPU``)
and wrk pinned to the other, alternating ``--parser twisted`` and ``--parser
llhttp`` for ROUNDS rounds, and reports per run:

* req/s from wrk;
* server CPU per request (the process's /proc utime+stime over the requests
  wrk completed), the measure that survives a shared, noisy machine better
  than throughput: it does not count the time the server was not scheduled.

Ratios are llhttp over twisted within the same round.

``--callgrind`` instead runs both servers under ``valgrind --tool=callgrind``
(bench/callgrind_tools.py) and reports instructions per request, the figure
a loaded machine cannot skew (a proxy: it misses cache misses and system-call
latency).  Under valgrind a server answers a few hundred requests a second.

Usage: python bench/llhttp_ab.py [--rounds 3] [--seconds 8] [--connections 50] [--callgrind]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`, in seconds."""
    return sum(user_sys_seconds(pid))


def user_sys_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of `pid`, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def wait_listening(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on {port} did not start")


def one_run(parser: str, seconds: int, connections: int, server_cpu: str, client_cpu: str) -> tuple[float, float, float]:
    """(req/s, server CPU µs per request, of which in the kernel) for one parser."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = subprocess.Popen(
        ["taskset", "-c", server_cpu, sys.executable, str(HERE / "ref_twisted_web.py"), str(port), "--parser", parser],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_listening(port)
        url = f"http://127.0.0.1:{port}/leads"
        wrk = ["taskset", "-c", client_cpu, "wrk", "-t1", f"-c{connections}", "-s", str(HERE / "post.lua")]
        subprocess.run(wrk + ["-d2s", url], check=True, capture_output=True)  # warm-up
        u0, s0 = user_sys_seconds(server.pid)
        out = subprocess.run(wrk + [f"-d{seconds}s", url], check=True, capture_output=True, text=True).stdout
        u1, s1 = user_sys_seconds(server.pid)
    finally:
        server.terminate()
        server.wait()
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rps, (u1 - u0 + s1 - s0) / requests * 1e6, (s1 - s0) / requests * 1e6


def callgrind_rounds(rounds: int, seconds: int) -> None:
    """Instructions per request of both parsers, under callgrind, rounds alternating."""
    import tempfile
    import urllib.request

    sys.path.insert(0, str(ROOT))
    from bench.callgrind_tools import Callgrind, wrk

    workdir = tempfile.mkdtemp(prefix="llhttp-callgrind-")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    servers = []
    try:
        for parser in ("twisted", "llhttp"):
            port = free_port()
            argv = [sys.executable, str(HERE / "ref_twisted_web.py"), str(port), "--parser", parser]
            servers.append((parser, Callgrind(f"ref-{parser}", argv, workdir, env), port))
        for _name, _, port in servers:
            wait_listening(port, 300)
            wrk(str(HERE / "post.lua"), port, 3)  # warm-up

        def poker(port: int):
            def poke() -> None:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/leads", data=b"{}", method="POST")
                urllib.request.urlopen(req, timeout=1).read()

            return poke

        per: dict = {"twisted": [], "llhttp": []}
        for r in range(rounds):
            for parser, proc, port in servers if r % 2 == 0 else list(reversed(servers)):
                proc.zero()
                n = wrk(str(HERE / "post.lua"), port, seconds)
                per[parser].append(proc.instructions(f"{parser}-{r}", poke=poker(port)) / n)
                print(f"round {r + 1} {parser:8s} {n} requests, {per[parser][-1]:,.0f} instructions/request", flush=True)
        ratios = [t / ll for t, ll in zip(per["twisted"], per["llhttp"])]
        print(
            f"instructions per request: twisted {statistics.median(per['twisted']):,.0f}, llhttp "
            f"{statistics.median(per['llhttp']):,.0f}; twisted/llhttp per round "
            + ", ".join(f"{x:.3f}" for x in ratios)
            + " (bar: 1.25x)"
        )
    finally:
        for _, proc, _ in servers:
            proc.stop()
        print(f"profiles and logs: {workdir}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--server-cpu", default="0")
    ap.add_argument("--client-cpu", default="1")
    ap.add_argument("--callgrind", action="store_true", help="instructions per request under callgrind instead")
    args = ap.parse_args()
    if args.callgrind:
        callgrind_rounds(args.rounds, args.seconds)
        return
    rps_ratios, cpu_ratios = [], []
    for r in range(args.rounds):
        res = {}
        for parser in ("twisted", "llhttp") if r % 2 == 0 else ("llhttp", "twisted"):
            res[parser] = one_run(parser, args.seconds, args.connections, args.server_cpu, args.client_cpu)
            print(f"round {r + 1} {parser:8s} {res[parser][0]:9.0f} req/s  {res[parser][1]:6.1f} µs CPU/req ({res[parser][2]:5.1f} in the kernel)", flush=True)
        rps_ratios.append(res["llhttp"][0] / res["twisted"][0])
        cpu_ratios.append(res["twisted"][1] / res["llhttp"][1])
        print(f"round {r + 1} llhttp/twisted: throughput {rps_ratios[-1]:.3f}x, CPU per request {cpu_ratios[-1]:.3f}x less", flush=True)
    print(
        f"median over {args.rounds} rounds: throughput {statistics.median(rps_ratios):.3f}x, "
        f"CPU/request gain {statistics.median(cpu_ratios):.3f}x (bar: 1.25x)"
    )


if __name__ == "__main__":
    main()
