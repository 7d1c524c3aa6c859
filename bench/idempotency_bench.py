"""Cost of Idempotency-Key dedup: stored POSTs with a unique key per request vs none, same relayd, one run.

    .venv/bin/python bench/idempotency_bench.py [--rounds 2] [--duration 8]

relayd (one process) on core 0 with a local redis-server, wrk -t1 -c50 on core 1; rounds alternate
plain / keyed so that drift hits both alike.  Issue 14's target: keyed >= 0.85x plain.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.harness import RedisServer, free_port, wait_for  # noqa: E402


def wrk(script: str, port: int, duration: int) -> float:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c50", f"-d{duration}s", "-s", script, f"http://127.0.0.1:{port}/leads"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout
    return float(re.search(r'"requests":(\d+)', out).group(1)) / duration  # type: ignore[union-attr]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=8)
    args = ap.parse_args()

    class _Case:  # RedisServer wants a TestCase-like owner for cleanups
        def __init__(self) -> None:
            self.cleanups: list = []

        def addCleanup(self, f, *a):  # noqa: N802
            self.cleanups.append((f, a))

    case = _Case()
    redis = RedisServer(case)  # type: ignore[arg-type]
    port, admin = free_port(), free_port()
    d = tempfile.mkdtemp(prefix="idem-bench-")
    conf = os.path.join(d, "relayd.conf")
    with open(conf, "w") as f:
        f.write(
            f'[server]\nlisten = "tcp:{port}:interface=127.0.0.1"\nadmin = "tcp:{admin}:interface=127.0.0.1"\n'
            f'[redis]\nurl = "{redis.url}"\n[spool]\ndir = "{d}/spool"\n'
            '[[route]]\npath = "/leads"\nlist = "leads"\n'
        )
    twistd = os.path.join(ROOT, ".venv", "bin", "twistd")
    proc = subprocess.Popen(["taskset", "-c", "0", twistd, "-n", "--pidfile=", "relayd", "--config", conf],
                            cwd=d, env=dict(os.environ, PYTHONPATH=ROOT), stdout=open(os.path.join(d, "relayd.log"), "wb"), stderr=subprocess.STDOUT)
    try:
        import urllib.request

        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz").status == 200, 30, "relayd ready")
        wrk("bench/post.lua", port, 2)  # warm-up
        rows = []
        for r in range(args.rounds):
            plain = wrk("bench/post.lua", port, args.duration)
            redis.command("DEL", "leads")
            keyed = wrk("bench/post_idem.lua", port, args.duration)
            redis.command("DEL", "leads")
            rows.append((r + 1, plain, keyed))
            print(f"round {r + 1}: plain {plain:,.0f} req/s, unique Idempotency-Key {keyed:,.0f} req/s, "
                  f"ratio {keyed / plain:.2f}x", flush=True)
        mp = sum(p for _, p, _ in rows) / len(rows)
        mk = sum(k for _, _, k in rows) / len(rows)
        print(f"mean: plain {mp:,.0f}, keyed {mk:,.0f}, keyed/plain {mk / mp:.2f}x (target >= 0.85x)")
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            print(f"relayd did not stop within 60 s; log: {d}/relayd.log")
            proc.kill()
        for f, a in reversed(case.cleanups):
            f(*a)
        time.sleep(0)


if __name__ == "__main__":
    main()
