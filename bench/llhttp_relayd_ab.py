"""relayd CPU per stored POST with twisted.web's parser vs llhttp (issue 13 item 3).

One redis-server, then relayd (``ack = "stored"``, one worker, spool on)
started through bench/relayd_llhttp.py with ``twisted`` and ``llhttp``
alternately, ROUNDS times each.  Per run: wrk ``-t1 -c20`` with
bench/post.lua for a warm-up, then WINDOWS one-second windows of relayd's
/proc utime+stime over the growth of the Redis list (requests stored).
Reported: minimum, 25th percentile and median of the windows, in µs of CPU
per stored request, per run; the pairs (same round) are what to compare on a
shared machine.

``--callgrind``: both relayds run at once under ``valgrind --tool=callgrind``
(bench/callgrind_tools.py; Redis runs natively) and the figure is relayd's
instructions per stored request over SECONDS-long wrk rounds, alternating:
what a loaded box cannot skew (a proxy: no cache misses, no kernel time).

Usage: python bench/llhttp_relayd_ab.py [--rounds 3] [--windows 10] [--callgrind [--seconds 15]]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.llhttp_ab import cpu_seconds, free_port  # noqa: E402

TICK_US = 1e6


def redis_llen(port: int) -> int:
    out = subprocess.run(["redis-cli", "-p", str(port), "llen", "leads"], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def one_run(parser: str, rport: int, workdir: str, windows: int) -> list:
    conf, port, admin = _conf(workdir, f"{parser}-{time.monotonic_ns()}", rport)
    log = open(os.path.join(workdir, f"{parser}.log"), "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "relayd_llhttp.py"), parser, "-n", "--pidfile=", "relayd", "--config", conf],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"relayd ({parser}) not ready; see {workdir}")
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/leads"
        wrk = ["wrk", "-t1", "-c20", "-s", str(HERE / "post.lua")]
        subprocess.run(wrk + ["-d2s", url], check=True, capture_output=True)
        load = subprocess.Popen(wrk + [f"-d{windows + 2}s", url], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        per_request = []
        for _ in range(windows):
            n0, c0 = redis_llen(rport), cpu_seconds(proc.pid)
            time.sleep(1)
            n1, c1 = redis_llen(rport), cpu_seconds(proc.pid)
            if n1 > n0 and c1 > c0:
                per_request.append((c1 - c0) / (n1 - n0) * TICK_US)
        load.wait()
    finally:
        proc.terminate()
        proc.wait()
        log.close()
    return sorted(per_request)


def _conf(workdir: str, name: str, rport: int, redis_extra: str = "") -> tuple:
    port, admin = free_port(), free_port()
    conf = os.path.join(workdir, f"{name}.conf")
    Path(conf).write_text(
        f'[server]\nlisten = "tcp:{port}:interface=127.0.0.1"\nadmin = "tcp:{admin}:interface=127.0.0.1"\nworkers = 1\n'
        f'[redis]\nurl = "redis://127.0.0.1:{rport}/0"\n{redis_extra}'
        f'[spool]\ndir = "{workdir}/spool-{name}"\nmax_bytes = "1GiB"\nfsync = "batch"\n'
        f'[[route]]\npath = "/leads"\nlist = "leads"\nack = "stored"\n'
    )
    return conf, port, admin


def callgrind_rounds(rport: int, workdir: str, rounds: int, seconds: int) -> None:
    """relayd instructions per stored request, both parsers under callgrind, rounds alternating."""
    from bench.callgrind_tools import Callgrind, wrk
    from tests.harness import wait_for

    relayds = []
    try:
        for parser in ("twisted", "llhttp"):
            conf, port, admin = _conf(workdir, f"cg-{parser}", rport, "reply_timeout = 30.0\n")
            argv = [sys.executable, str(HERE / "relayd_llhttp.py"), parser, "-n", "--pidfile=", "relayd", "--config", conf]
            proc = Callgrind(f"relayd-{parser}", argv, workdir, dict(os.environ))
            relayds.append((parser, proc, port))
            wait_for(lambda a=admin: urllib.request.urlopen(f"http://127.0.0.1:{a}/readyz", timeout=30).status == 200,
                     300, f"relayd {parser} ready under valgrind")  # fmt: skip
            wrk(str(HERE / "post.lua"), port, 5)  # warm-up
        per: dict = {"twisted": [], "llhttp": []}
        for r in range(rounds):
            for parser, proc, port in relayds if r % 2 == 0 else list(reversed(relayds)):
                proc.zero()
                n = wrk(str(HERE / "post.lua"), port, seconds)
                per[parser].append(proc.instructions(f"{parser}-{r}") / n)
                print(f"round {r + 1} {parser:8s} {n} requests, relayd {per[parser][-1]:,.0f} instructions/request", flush=True)
        ratios = [t / ll for t, ll in zip(per["twisted"], per["llhttp"])]
        print(f"relayd instructions per stored POST: twisted {statistics.median(per['twisted']):,.0f}, llhttp "
              f"{statistics.median(per['llhttp']):,.0f}; twisted/llhttp per round " + ", ".join(f"{x:.3f}" for x in ratios))  # fmt: skip
    finally:
        for _, proc, _ in relayds:
            proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--callgrind", action="store_true", help="instructions per request under callgrind instead")
    ap.add_argument("--seconds", type=int, default=15, help="wrk seconds per callgrind round")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="llhttp-relayd-")
    rport = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    p25s: dict = {"twisted": [], "llhttp": []}
    try:
        time.sleep(0.5)
        if args.callgrind:
            callgrind_rounds(rport, workdir, args.rounds, args.seconds)
            return
        for r in range(args.rounds):
            for parser in ("twisted", "llhttp") if r % 2 == 0 else ("llhttp", "twisted"):
                w = one_run(parser, rport, workdir, args.windows)
                p25s[parser].append(w[len(w) // 4])
                print(f"round {r + 1} {parser:8s} µs CPU per stored POST: min {w[0]:.1f} p25 {w[len(w) // 4]:.1f} "
                      f"median {w[len(w) // 2]:.1f} ({len(w)} windows)", flush=True)  # fmt: skip
            print(f"round {r + 1} twisted/llhttp (p25): {p25s['twisted'][-1] / p25s['llhttp'][-1]:.3f}x", flush=True)
        ratios = [t / ll for t, ll in zip(p25s["twisted"], p25s["llhttp"])]
        print(f"median twisted/llhttp CPU per stored POST (p25): {statistics.median(ratios):.3f}x")
    finally:
        redis.terminate()
        redis.wait()
        print(f"logs: {workdir}")


if __name__ == "__main__":
    main()
