"""Cost of Idempotency-Key dedup: stored POSTs with a unique key per request vs none, same relayd, one run.

    .venv/bin/python bench/idempotency_bench.py [--rounds 3] [--duration 8] [--baseline-code DIR]

relayd (one process) and a local redis-server on core 0 (as in bench/run.py: the load generator
owns core 1), wrk -t1 -c50 on core 1; rounds alternate plain / keyed so that drift hits both alike.
``--redis-core 1`` moves redis-server next to wrk instead, to test whether the script's work on
relayd's core makes relayd itself slower (an open question: docs/benchmarks.md, "Idempotency-Key cost").
Issue 14's target: keyed >= 0.85x plain.

Besides requests/s, each row gives the CPU time relayd and redis-server spent per request
(from /proc/<pid>/stat): on a shared, loaded box the throughput of a round depends on what else
runs, the CPU per request much less.  With both on core 0, (relayd + redis) CPU per request
plain / keyed is what the throughput ratio would be on a quiet box.

``--baseline-code DIR`` also starts a second relayd from another checkout (e.g. ``git archive
<commit> | tar -x -C DIR``), sharing the redis-server, and interleaves its rounds with this
tree's: before/after in the same conditions.  ``--profile DIR`` records a py-spy profile (raw
format) of one plain and one keyed round of each relayd into DIR.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.harness import RedisServer, free_port, wait_for  # noqa: E402

MODES = (("plain", "bench/post.lua"), ("keyed", "bench/post_idem.lua"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(script: str, port: int, duration: int) -> int:
    """Requests wrk completed (non-2xx fail the run: a refused POST is not a stored one)."""
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c50", f"-d{duration}s", "-s", script, f"http://127.0.0.1:{port}/leads"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout
    m = re.search(r'"requests":(\d+).*"err_status":(\d+)', out)
    assert m is not None, out
    if int(m.group(2)):
        raise SystemExit(f"{m.group(2)} non-2xx answers in a round; see relayd's log")
    return int(m.group(1))


class Relayd:
    """One `twistd relayd` on core 0 from a given checkout, with its own spool, on the shared Redis."""

    def __init__(self, name: str, code: str, redis_url: str) -> None:
        self.name = name
        self.port, admin = free_port(), free_port()
        self.dir = tempfile.mkdtemp(prefix=f"idem-bench-{name}-")
        conf = os.path.join(self.dir, "relayd.conf")
        with open(conf, "w") as f:
            f.write(
                f'[server]\nlisten = "tcp:{self.port}:interface=127.0.0.1"\nadmin = "tcp:{admin}:interface=127.0.0.1"\n'
                f'[redis]\nurl = "{redis_url}"\n[spool]\ndir = "{self.dir}/spool"\n'
                '[[route]]\npath = "/leads"\nlist = "leads"\n'
            )
        twistd = os.path.join(ROOT, ".venv", "bin", "twistd")
        self.proc = subprocess.Popen(
            ["taskset", "-c", "0", twistd, "-n", "--pidfile=", "relayd", "--config", conf],
            cwd=self.dir, env=dict(os.environ, PYTHONPATH=code),
            stdout=open(os.path.join(self.dir, "relayd.log"), "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz").status == 200, 60, f"{name} ready")
        wrk("bench/post.lua", self.port, 2)  # warm-up

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            print(f"relayd {self.name} did not stop within 60 s; log: {self.dir}/relayd.log")
            self.proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--baseline-code", help="another checkout to measure in the same run (before/after)")
    ap.add_argument("--profile", help="directory for py-spy raw profiles of one round per relayd and mode")
    ap.add_argument(
        "--redis-core", default="0",
        help="core for redis-server (default 0, relayd's: both count, as the target is defined); 1 puts it with wrk, "
        "to see how much of relayd's keyed cost comes from sharing its core with the script",
    )  # fmt: skip
    args = ap.parse_args()

    class _Case:  # RedisServer wants a TestCase-like owner for cleanups
        def __init__(self) -> None:
            self.cleanups: list = []

        def addCleanup(self, f, *a):  # noqa: N802
            self.cleanups.append((f, a))

    case = _Case()
    redis = RedisServer(case)  # type: ignore[arg-type]
    assert redis.proc is not None
    subprocess.run(["taskset", "-p", "-c", args.redis_core, str(redis.proc.pid)], check=True, capture_output=True)
    relayds: List[Relayd] = []
    # (relayd, mode) -> list of (req/s, relayd us/req, redis us/req)
    rows: Dict[Tuple[str, str], List[Tuple[float, float, float]]] = {}
    try:
        relayds.append(Relayd("this", ROOT, redis.url))
        if args.baseline_code:
            relayds.append(Relayd("baseline", os.path.abspath(args.baseline_code), redis.url))
        print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores", flush=True)
        for r in range(args.rounds):
            # Alternate which relayd goes first, so neither always follows the other.
            order = relayds if r % 2 == 0 else list(reversed(relayds))
            for relayd in order:
                line = []
                for mode, script in MODES:
                    spy: Optional[subprocess.Popen] = None
                    if args.profile and r == 0:
                        os.makedirs(args.profile, exist_ok=True)
                        spy = subprocess.Popen(
                            [os.path.join(ROOT, ".venv", "bin", "py-spy"), "record", "--format", "raw", "-r", "250",
                             "-d", str(args.duration), "-p", str(relayd.proc.pid), "--nonblocking",
                             "-o", os.path.join(args.profile, f"{relayd.name}-{mode}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        )  # fmt: skip
                    c0, r0 = cpu_seconds(relayd.proc.pid), cpu_seconds(redis.proc.pid)
                    n = wrk(script, relayd.port, args.duration)
                    c1, r1 = cpu_seconds(relayd.proc.pid), cpu_seconds(redis.proc.pid)
                    if spy is not None:
                        spy.wait()
                    redis.command("DEL", "leads")
                    row = (n / args.duration, (c1 - c0) / n * 1e6, (r1 - r0) / n * 1e6)
                    rows.setdefault((relayd.name, mode), []).append(row)
                    line.append(f"{mode} {row[0]:,.0f} req/s (relayd {row[1]:.0f} us/req, redis {row[2]:.1f})")
                plain, keyed = rows[(relayd.name, "plain")][-1][0], rows[(relayd.name, "keyed")][-1][0]
                print(f"round {r + 1} {relayd.name:8s}: {', '.join(line)}; keyed/plain {keyed / plain:.2f}x", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        for relayd in relayds:
            mean = {m: [sum(x[i] for x in rows[(relayd.name, m)]) / args.rounds for i in range(3)] for m, _ in MODES}
            p, k = mean["plain"], mean["keyed"]
            print(f"mean {relayd.name:8s}: plain {p[0]:,.0f} req/s, keyed {k[0]:,.0f} req/s, keyed/plain {k[0] / p[0]:.2f}x "
                  f"(target >= 0.85x); CPU per request: relayd {p[1]:.0f} -> {k[1]:.0f} us, "
                  f"redis {p[2]:.1f} -> {k[2]:.1f} us; plain/keyed (relayd + redis) {(p[1] + p[2]) / (k[1] + k[2]):.2f}x")
    finally:
        for relayd in relayds:
            relayd.stop()
        for f, a in reversed(case.cleanups):
            f(*a)
        time.sleep(0)


if __name__ == "__main__":
    main()
