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
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.harness import free_port, wait_for  # noqa: E402

MODES = (("plain", "bench/post.lua"), ("keyed", "bench/post_idem.lua"))
VALGRIND = ["valgrind", "--tool=callgrind"]


def wrk(script: str, port: int, duration: int) -> int:
    """Requests wrk completed in `duration` seconds."""
    out = subprocess.run(
        ["wrk", "-t1", "-c50", f"-d{duration}s", "-s", script, f"http://127.0.0.1:{port}/leads"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout
    m = re.search(r'"requests":(\d+)', out)
    assert m is not None, out
    return int(m.group(1))


class Callgrind:
    """A process under callgrind whose counters can be zeroed and read."""

    def __init__(self, name: str, argv: List[str], workdir: str, env: Dict[str, str]) -> None:
        self.name = name
        self.out = os.path.join(workdir, f"{name}.cg")
        self.proc = subprocess.Popen(
            [*VALGRIND, f"--callgrind-out-file={self.out}", *argv], cwd=workdir, env=env,
            stdout=open(os.path.join(workdir, f"{name}.log"), "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )  # fmt: skip

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.proc.pid)], capture_output=True, check=False)

    def zero(self) -> None:
        """Start counting from now."""
        self._control("-z")

    def instructions(self, label: str) -> int:
        """Instructions executed since `zero` (dumps a profile file and reads its summary)."""
        before = set(glob.glob(self.out + "*"))
        self._control("-d", label)
        wait_for(lambda: bool(set(glob.glob(self.out + "*")) - before), 120, f"{self.name} callgrind dump")
        path = sorted(set(glob.glob(self.out + "*")) - before)[-1]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(path) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        return int(line.split()[1])
            time.sleep(0.2)  # the dump is still being written
        raise RuntimeError(f"no summary in {path}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


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
            port, admin = free_port(), free_port()
            conf = os.path.join(workdir, f"{name}.conf")
            with open(conf, "w") as f:
                f.write(
                    f'[server]\nlisten = "tcp:{port}:interface=127.0.0.1"\nadmin = "tcp:{admin}:interface=127.0.0.1"\n'
                    f'[redis]\nurl = "redis://127.0.0.1:{rport}/0"\nreply_timeout = 30.0\n'
                    f'[spool]\ndir = "{workdir}/spool-{name}"\n[[route]]\npath = "/leads"\nlist = "leads"\n'
                )
            venv = os.path.join(ROOT, ".venv", "bin")
            proc = Callgrind(f"relayd-{name}", [os.path.join(venv, "python"), os.path.join(venv, "twistd"), "-n",
                                                "--pidfile=", "relayd", "--config", conf],
                             workdir, dict(os.environ, PYTHONPATH=code))  # fmt: skip
            procs.append(proc)
            wait_for(lambda a=admin: urllib.request.urlopen(f"http://127.0.0.1:{a}/readyz", timeout=30).status == 200,
                     300, f"relayd {name} ready under valgrind")  # fmt: skip
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
