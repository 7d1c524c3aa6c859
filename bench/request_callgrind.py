"""Per-request cost in instructions (callgrind): relayd vs raw twisted.web, a figure a loaded box cannot skew.

    .venv/bin/python bench/request_callgrind.py [--rounds 2] [--duration 15] [--baseline-code DIR]

The scenario of bench/run.sh's single-POST rows (~200 B JSON, keep-alive, wrk -c50), with every
server under ``valgrind --tool=callgrind``: the raw twisted.web reference (bench/ref_twisted_web.py,
no Redis), relayd with ``ack = "stored"`` and relayd with ``ack = "accepted"`` (one process each,
one shared Redis).  The figure is instructions per request; relayd's rows add Redis's, because in
bench/run.sh Redis shares relayd's core.  The ratio *reference / relayd* is what throughput on
one core would show if instructions were all that mattered (issue 13's targets: stored >= 0.85x,
accepted >= 0.9x).  It misses system-call latency and cache misses, so it is a proxy for
bench/run.sh on a quiet box, not a substitute.  `--baseline-code` measures another checkout's
relayd in the same run (before/after).

Under valgrind a server answers ~50-150 requests/s, so each round has a few thousand requests.
Needs valgrind (Debian package ``valgrind``); bench-only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.request
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.callgrind_tools import Callgrind, relayd_under_callgrind, wrk  # noqa: E402
from tests.harness import free_port, wait_for  # noqa: E402

SCRIPT = "bench/post.lua"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--baseline-code", help="another checkout whose relayd is measured in the same run")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="request-callgrind-")
    venv = os.path.join(ROOT, ".venv", "bin")
    rport = free_port()
    procs: List[Callgrind] = []
    redis = Callgrind("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", workdir], workdir, dict(os.environ))  # fmt: skip
    procs.append(redis)
    servers: List[Tuple[str, Callgrind, int, bool]] = []  # name, process, port, uses Redis
    try:
        port = free_port()
        ref = Callgrind("reference", [os.path.join(venv, "python"), os.path.join(ROOT, "bench", "ref_twisted_web.py"),
                                      str(port)], workdir, dict(os.environ))  # fmt: skip
        procs.append(ref)
        wait_for(lambda p=port: _answers(p), 300, "the reference under valgrind")
        wrk(SCRIPT, port, 5)
        servers.append(("raw twisted.web", ref, port, False))
        codes = [("this", ROOT)] + ([("baseline", os.path.abspath(args.baseline_code))] if args.baseline_code else [])
        for code_name, code in codes:
            for ack in ("stored", "accepted"):
                name = f"relayd {ack} ({code_name})"
                proc, port = relayd_under_callgrind(f"{code_name}-{ack}", code, workdir, rport, ack=ack,
                                                    list_name=f"leads-{code_name}-{ack}",
                                                    extra_conf="[buffer]\nack_timeout = 60.0\n")  # fmt: skip
                procs.append(proc)
                wrk(SCRIPT, port, 5)  # warm-up: imports, first batches
                servers.append((name, proc, port, True))
        rows: Dict[str, List[float]] = {}
        for r in range(args.rounds):
            for name, proc, port, uses_redis in servers if r % 2 == 0 else list(reversed(servers)):
                proc.zero()
                redis.zero()
                n = wrk(SCRIPT, port, args.duration)
                own = proc.instructions(f"{r}", None if uses_redis else (lambda p=port: _answers(p))) / n
                theirs = redis.instructions(f"{name}-{r}") / n if uses_redis else 0.0
                rows.setdefault(name, []).append(own + theirs)
                print(f"round {r + 1} {name:26s}: {n} requests; instructions per request {own:,.0f}"
                      f" + redis {theirs:,.0f}", flush=True)  # fmt: skip
        base = sum(rows["raw twisted.web"]) / args.rounds
        print("\n| server | instructions per request (server + Redis) | reference / server |\n|---|---:|---:|")
        for name, _, _, _ in servers:
            mean = sum(rows[name]) / args.rounds
            print(f"| {name} | {mean:,.0f} | {base / mean:.2f}x |")
    finally:
        for proc in reversed(procs):
            proc.stop()
        print(f"profiles and logs: {workdir}")


def _answers(port: int) -> bool:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/leads", data=b"{}", method="POST")
    return urllib.request.urlopen(req, timeout=30).status == 200


if __name__ == "__main__":
    main()
