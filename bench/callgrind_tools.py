"""Instructions per request under callgrind: the shared parts of bench/*_callgrind.py.

A process runs under ``valgrind --tool=callgrind``; its counters are zeroed
before a round and dumped after it, and the figure is instructions divided
by the requests wrk completed.  Throughput on a shared 2-core box swings 2x
between rounds; instruction counts do not (they miss cache misses and
system-call latency, so they are a proxy).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import time
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Tuple

from tests.harness import free_port, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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

    def instructions(self, label: str, poke: Optional[Callable[[], Any]] = None) -> int:
        """Instructions executed since `zero` (dumps a profile file and reads its summary).

        callgrind handles a dump request only when the process runs: `poke`
        wakes one that has no timers of its own (a request to the reference
        server); its own cost is a rounding error next to a round's.
        """
        before = set(glob.glob(self.out + "*"))
        if poke is None:
            self._control("-d", label)
        else:  # callgrind_control waits for the dump: wake the process while it does
            control = subprocess.Popen(["callgrind_control", "-d", label, str(self.proc.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            while control.poll() is None:
                try:
                    poke()
                except Exception:  # noqa: BLE001 - only a wake-up
                    pass
                time.sleep(0.2)

        def dumped() -> bool:
            if poke is not None:
                try:
                    poke()
                except Exception:  # noqa: BLE001 - only a wake-up
                    pass
            return bool(set(glob.glob(self.out + "*")) - before)

        wait_for(dumped, 120, f"{self.name} callgrind dump", interval=0.5)
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


def relayd_under_callgrind(
    name: str, code: str, workdir: str, redis_port: int, ack: str = "stored", list_name: str = "leads",
    extra_conf: str = "",
) -> Tuple[Callgrind, int]:
    """``twistd -n relayd`` running `code` (a checkout) under callgrind with one route ``/leads``; ready.

    Generous reply and ack timeouts: under valgrind a process runs ~50x
    slower.  Returns the process and its ingest port.
    """
    port, admin = free_port(), free_port()
    conf = os.path.join(workdir, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(
            f'[server]\nlisten = "tcp:{port}:interface=127.0.0.1"\nadmin = "tcp:{admin}:interface=127.0.0.1"\n'
            f'[redis]\nurl = "redis://127.0.0.1:{redis_port}/0"\nreply_timeout = 30.0\n{extra_conf}'
            f'[spool]\ndir = "{workdir}/spool-{name}"\n'
            f'[[route]]\npath = "/leads"\nlist = "{list_name}"\nack = "{ack}"\n'
        )
    venv = os.path.join(ROOT, ".venv", "bin")
    proc = Callgrind(f"relayd-{name}", [os.path.join(venv, "python"), os.path.join(venv, "twistd"), "-n",
                                        "--pidfile=", "relayd", "--config", conf],
                     workdir, dict(os.environ, PYTHONPATH=code))  # fmt: skip
    try:
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=30).status == 200,
                 300, f"relayd {name} ready under valgrind")  # fmt: skip
    except BaseException:
        proc.stop()
        raise
    return proc, port
