"""Cost of Idempotency-Key dedup in instructions per request (callgrind): a figure a loaded box cannot skew.

    .venv/bin/python bench/idempotency_callgrind.py [--rounds 2] [--duration 20] [--baseline-code DIR]

Same scenario as bench/idempotency_bench.py (one relayd, stored acks, wrk -c50 with ~200 B JSON
POSTs, with a unique Idempotency-Key per request or none), but relayd and redis-server run under
``valgrind --tool=callgrind`` and the figure is the instructions each executed per request
(counters zeroed before a round, dumped after it).  Throughput on a 2-core box shared with other
test runs swings 2x between rounds; instruction counts do not.  They miss what instructions do
not show (cache misses, system-call latency), so they are a proxy: the code before the cost work
(7ac7263) had a keyed/plain throughput ratio of 0.74-0.77x on a quiet box, 0.70-0.74x here.

Under valgrind relayd serves ~50-100 requests/s, so each round has ~1,000 requests.
Needs valgrind (Debian package ``valgrind``); bench-only, not needed by the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.callgrind_tools import Callgrind, relayd_under_callgrind, wrk  # noqa: E402
from tests.harness import free_port  # noqa: E402

MODES = (("plain", "bench/post.lua"), ("keyed", "bench/post_idem.lua"))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--baseline-code", help="another checkout to measure in the same run (before/after)")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="idem-callgrind-")
    rport = free_port()
    procs: List[Callgrind] = []
    redis = Callgrind("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", workdir], workdir, dict(os.environ))  # fmt: skip
    procs.append(redis)
    relayds: List[Tuple[str, Callgrind, int]] = []
    try:
        codes = [("this", ROOT)] + ([("baseline", os.path.abspath(args.baseline_code))] if args.baseline_code else [])
        for name, code in codes:
            proc, port = relayd_under_callgrind(name, code, workdir, rport)
            procs.append(proc)
            for _, script in MODES:
                wrk(script, port, 5)  # warm-up: imports, first batches, script load
            relayds.append((name, proc, port))
        rows: Dict[Tuple[str, str], List[Tuple[float, float]]] = {}
        for r in range(args.rounds):
            for name, proc, port in relayds if r % 2 == 0 else list(reversed(relayds)):
                for mode, script in MODES:
                    proc.zero()
                    redis.zero()
                    n = wrk(script, port, args.duration)
                    row = (proc.instructions(f"{mode}-{r}") / n, redis.instructions(f"{name}-{mode}-{r}") / n)
                    rows.setdefault((name, mode), []).append(row)
                    print(f"round {r + 1} {name:8s} {mode}: {n} requests; instructions per request: relayd {row[0]:,.0f}, "
                          f"redis {row[1]:,.0f}", flush=True)
        for name, _, _ in relayds:
            p = [sum(x[i] for x in rows[(name, "plain")]) / args.rounds for i in range(2)]
            k = [sum(x[i] for x in rows[(name, "keyed")]) / args.rounds for i in range(2)]
            print(f"mean {name:8s}: relayd {p[0]:,.0f} -> {k[0]:,.0f}, redis {p[1]:,.0f} -> {k[1]:,.0f} instructions per "
                  f"request; plain/keyed (relayd + redis) {(p[0] + p[1]) / (k[0] + k[1]):.2f}x (target >= 0.85x)")
    finally:
        for proc in reversed(procs):
            proc.stop()
        print(f"profiles and logs: {workdir}")


if __name__ == "__main__":
    main()
