"""relayd instructions per message, this checkout vs another (callgrind): A/B a loaded box cannot skew.

    .venv/bin/python bench/instructions_ab.py --baseline-code DIR [--script bench/post.lua]
        [--lines 1] [--ack stored] [--connections 20] [--rounds 2] [--seconds 15]

One native redis-server; two relayds (``ack`` as given, one route ``/leads``) under
``valgrind --tool=callgrind`` (bench/callgrind_tools.py), one running this checkout's code and
one `--baseline-code`'s (another git worktree: ``git worktree add --detach ../base <commit>``),
both with this checkout's virtualenv.  Rounds alternate the order; per round: counters zeroed,
wrk ``-t1 -c<connections>`` with `--script` for `--seconds`, counters dumped.  The figure is
relayd's instructions per message (requests x `--lines`; 1000 for bench/ndjson.lua): Redis and
the kernel are not counted, cache misses and system-call latency are not seen, so it is a proxy
for CPU per message, not a substitute for bench/run.sh on a quiet box.

Needs valgrind (Debian package ``valgrind``); bench-only.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.callgrind_tools import Callgrind, relayd_under_callgrind  # noqa: E402
from tests.harness import free_port  # noqa: E402


def wrk(script: str, port: int, seconds: int, connections: int) -> int:
    """Requests wrk completed."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script, f"http://127.0.0.1:{port}/leads"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout  # fmt: skip
    m = re.search(r"(\d+) requests in", out)
    assert m is not None, out
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--baseline-code", required=True, help="another checkout whose relayd is measured in the same run")
    ap.add_argument("--script", default="bench/post.lua")
    ap.add_argument("--lines", type=int, default=1, help="messages per request (1000 for bench/ndjson.lua)")
    ap.add_argument("--ack", default="stored", choices=("stored", "accepted"))
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=15)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="instructions-ab-")
    rport = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)  # fmt: skip
    procs: List[Callgrind] = []
    try:
        relayds: List[Tuple[str, Callgrind, int]] = []
        for name, code in (("this", ROOT), ("baseline", os.path.abspath(args.baseline_code))):
            proc, port = relayd_under_callgrind(name, code, workdir, rport, ack=args.ack)
            procs.append(proc)
            wrk(args.script, port, 4, args.connections)  # warm-up: imports, first batches
            relayds.append((name, proc, port))
        rows: Dict[str, List[float]] = {}
        for r in range(args.rounds):
            for name, proc, port in relayds if r % 2 == 0 else list(reversed(relayds)):
                proc.zero()
                n = wrk(args.script, port, args.seconds, args.connections)
                per = proc.instructions(f"{name}-{r}") / (n * args.lines)
                rows.setdefault(name, []).append(per)
                print(f"round {r + 1} {name:8s}: {n} requests, {per:,.0f} relayd instructions per message", flush=True)
        this, base = (sum(rows[k]) / len(rows[k]) for k in ("this", "baseline"))
        print(f"mean: this {this:,.0f}, baseline {base:,.0f} instructions per message; this/baseline {this / base:.3f}")
    finally:
        for proc in reversed(procs):
            proc.stop()
        redis.terminate()
        print(f"profiles and logs: {workdir}")


if __name__ == "__main__":
    main()
