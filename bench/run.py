#!/usr/bin/env python3
"""One-command, side-by-side HTTP ingest benchmark for relayd.

    bench/run.sh                 # or: .venv/bin/python bench/run.py

Measures, in ONE run and on the same machine state:

  nginx            nginx `return 200` (1 worker, no access log): the ceiling
                   of this box + wrk for keep-alive POSTs.
  twisted-web      bench/ref_twisted_web.py: a raw twisted.web Resource that
                   reads + ujson-parses the body and keeps it in memory. The
                   Python/Twisted ceiling (no Redis).
  naive            bench/ref_naive_starlette.py: Starlette on uvicorn, one
                   LPUSH per request via redis.asyncio, 2xx after Redis.
  relayd-stored    relayd, route ack="stored".
  relayd-accepted  relayd, route ack="accepted".
  relayd-ndjson    relayd, NDJSON bodies of 1000 x ~200 B lines (ack="stored"),
                   reported as messages/s and checked against Redis LLEN.

The server under test (and Redis, when one is used) runs on core 0
(`taskset -c 0`), wrk on core 1 (`taskset -c 1 wrk -t1 -c50 -d10s --latency`).
Each target gets a fresh server process and a 3 s warm-up before the measured
run. Raw wrk outputs and server logs go to bench/results/<timestamp>/
(gitignored); the summary is written to docs/benchmarks.md.

Only 127.0.0.1 is loaded; every load loop is bounded by wrk's -d.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV = ROOT / ".venv"
VENV_PY = VENV / "bin" / "python"
TWISTD = VENV / "bin" / "twistd"
PYSPY = VENV / "bin" / "py-spy"
DOC = ROOT / "docs" / "benchmarks.md"

SERVER_CORE = "0"
LOAD_CORE = "1"
BATCH_LINES = 1000

TARGETS_TEXT = {
    "nginx": "nginx `return 200` (1 worker, access_log off)",
    "twisted-web": "raw twisted.web Resource + ujson, in-memory list (no Redis)",
    "klein": "same work as raw twisted.web, routed by Klein (no Redis)",
    "naive": "Starlette + uvicorn, 1 LPUSH/request (redis.asyncio)",
    "relayd-stored": 'relayd, ack = "stored"',
    "relayd-accepted": 'relayd, ack = "accepted"',
    "relayd-ndjson": 'relayd, NDJSON 1000 lines/request, ack = "stored"',
    "relayd-ndjson-accepted": 'relayd, NDJSON 1000 lines/request, ack = "accepted"',
    "twisted-web-paced": "raw twisted.web, paced load (tail latency at --paced-rate)",
    "relayd-stored-paced": 'relayd, ack = "stored", paced load (tail latency at --paced-rate)',
}
ALL_TARGETS = list(TARGETS_TEXT)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------
# Set-up: system tools and Python deps
# --------------------------------------------------------------------------


def ensure_system_tools() -> None:
    need = {"wrk": "wrk", "nginx": "nginx-light", "redis-server": "redis-server",
            "redis-cli": "redis-server", "taskset": "util-linux"}
    missing = sorted({pkg for tool, pkg in need.items() if shutil.which(tool) is None
                      and not Path("/usr/sbin", tool).exists()})
    if not missing:
        return
    log(f"installing Debian packages: {' '.join(missing)}")
    root = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(root + ["apt-get", "update", "-qq"], check=True, env=env)
    pkgs = sorted(set(missing) | {"wrk", "nginx-light", "redis-server"})
    subprocess.run(root + ["apt-get", "install", "-y", "-qq", *pkgs], check=True, env=env)


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def ensure_python_deps() -> None:
    if not VENV_PY.exists():
        raise SystemExit(f"no venv at {VENV}: run scripts/bootstrap (or bench/run.sh) first")
    probe = "import starlette, uvicorn, redis, ujson, twisted"
    ok = subprocess.run([str(VENV_PY), "-c", probe], capture_output=True).returncode == 0
    if ok and PYSPY.exists():
        return
    log("installing bench/requirements.txt into the venv")
    subprocess.run([str(VENV_PY), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-r", str(BENCH / "requirements.txt")], check=True)


def venv_has(module: str) -> bool:
    return subprocess.run([str(VENV_PY), "-c", f"import {module}"], capture_output=True).returncode == 0


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_cpu_seconds(pgid: int) -> float:
    """utime+stime of every live process in process group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # fields[0] is state (field 3); pgrp is field 5, utime 14, stime 15
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


class Proc:
    """A child started in its own session, so that it and any workers it
    forks can be stopped together (by its own process-group id) and its CPU
    time can be summed."""

    def __init__(self, name: str, cmd: list[str], logfile: Path, env: dict | None = None,
                 cwd: Path | None = None):
        self.name = name
        self.cmd = [str(c) for c in cmd]
        self.logfile = logfile
        self._fh = open(logfile, "ab")
        self._fh.write(("$ " + shlex.join(self.cmd) + "\n").encode())
        self._fh.flush()
        self.p = subprocess.Popen(self.cmd, stdout=self._fh, stderr=subprocess.STDOUT,
                                  env=env, cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def cpu(self) -> float:
        return group_cpu_seconds(self.p.pid)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout}s of SIGTERM: SIGKILL")
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(5)
        self._fh.close()
        return self.p.returncode

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def wait_tcp(port: int, proc: Proc, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def http(method: str, url: str, body: bytes | None = None, ctype: str = "application/json",
         timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError) as e:
        return 0, str(e).encode()


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------


class Redis:
    def __init__(self, workdir: Path, results: Path):
        self.port = free_port()
        d = Path(tempfile.mkdtemp(prefix="redis-", dir=workdir))
        self.proc = Proc("redis", ["taskset", "-c", SERVER_CORE, "redis-server", "--port", str(self.port),
                                   "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                   "--dir", str(d), "--protected-mode", "no"],
                         results / "redis.log")
        if not wait_tcp(self.port, self.proc, 10):
            raise SystemExit("redis-server did not start:\n" + self.proc.tail())
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip()

    def llen(self, key: str) -> int:
        v = self.cli("LLEN", key)
        return int(v) if v.lstrip("-").isdigit() else -1

    def settle(self, key: str, quiet: float = 1.0, limit: float = 30.0) -> int:
        """LLEN once it stopped changing for ``quiet`` seconds (relayd may
        still be forwarding buffered/spooled messages after wrk ends)."""
        deadline = time.monotonic() + limit
        last, since = self.llen(key), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            n = self.llen(key)
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last


# --------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------


def wrk_cmd(url: str, script: str, duration: int, conns: int) -> list[str]:
    return ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency",
            "-s", script, url]


def proc_stat() -> dict[str, list[int]]:
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu"):
                name, *vals = line.split()
                out[name] = [int(v) for v in vals]
    return out


def core_usage(a: dict, b: dict) -> dict:
    """Per-core busy% and steal% between two /proc/stat snapshots."""
    res = {}
    for name in b:
        if name == "cpu" or name not in a:
            continue
        d = [y - x for x, y in zip(a[name], b[name])]
        # user nice system idle iowait irq softirq steal guest guest_nice
        total = sum(d[:8]) or 1
        idle = d[3] + d[4]
        res[name] = {"busy": 100.0 * (total - idle - d[7]) / total, "steal": 100.0 * d[7] / total}
    return res


def run_wrk(url: str, script: str, duration: int, conns: int, outfile: Path,
            server: list[Proc] | None = None, status_hook: bool = True, pace_ms: float | None = None) -> dict:
    cmd = wrk_cmd(url, script, duration, conns)
    env = dict(os.environ, BATCH_LINES=str(BATCH_LINES), WRK_STATUS_HOOK="1" if status_hook else "0")
    if pace_ms is not None:
        env["WRK_PACE_MS"] = f"{pace_ms:.3f}"
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = [p.cpu() for p in server or []]
    st0 = proc_stat()
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, env=env,
                         cwd=ROOT)
    wall = time.monotonic() - t0
    st1 = proc_stat()
    cpu1 = [p.cpu() for p in server or []]
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    outfile.write_text("$ " + shlex.join(cmd) + "\n" + out.stdout + out.stderr)
    m = re.search(r"^BENCHJSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed (rc={out.returncode}): {out.stderr.strip()[:500]}")
    r = json.loads(m.group(1))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["rps_wrk_line"] = float(rps.group(1)) if rps else None
    r["non2xx"] = r["err_status"]
    r["sock_errors"] = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
    r["ok"] = r["requests"] - r["err_status"]
    wrk_cpu = ((after_children.ru_utime - before_children.ru_utime)
               + (after_children.ru_stime - before_children.ru_stime))
    r["wrk_cpu_pct"] = 100 * wrk_cpu / wall
    r["server_cpu_pct"] = [100 * (b - a) / wall for a, b in zip(cpu0, cpu1)]
    cores = core_usage(st0, st1)
    r["cores"] = cores
    r["steal_pct"] = sum(c["steal"] for c in cores.values())
    # CPU that neither the server(s) nor wrk used: other processes on the box
    # (e.g. someone's test suite), in % of one core. Includes a little kernel
    # work (softirq) that isn't charged to any process.
    r["foreign_cpu_pct"] = max(0.0, sum(c["busy"] for c in cores.values()) - sum(r["server_cpu_pct"])
                               - r["wrk_cpu_pct"])
    r["cmd"] = shlex.join(cmd)
    return r


# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_body_buffer_size 16k;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{{"status":"OK"}}';
        }}
    }}
}}
"""

RELAYD_CONF = """\
# generated by bench/run.py
[server]
listen = "tcp:{port}:interface=127.0.0.1"
admin = "tcp:{admin}:interface=127.0.0.1"
workers = 1

[redis]
url = "{redis_url}"

[spool]
dir = "{spool}"
max_bytes = "1GiB"
fsync = "batch"

[[route]]
path = "/leads"
list = "leads"
ack = "{ack}"
"""


class Target:
    name = ""
    script = "bench/post.lua"
    batch = 1
    status_hook = True
    redis_key: str | None = None
    clean_exit_required = False  # relayd's contract: SIGTERM -> exit 0

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.procs: list[Proc] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/leads"
        self.notes: list[str] = []

    def start(self) -> None:
        raise NotImplementedError

    def pace_ms(self) -> float | None:
        """Per-connection pause between requests (paced targets), else None."""
        return None

    def ready(self) -> tuple[bool, str]:
        body = self.ctx.sample_body if self.batch == 1 else self.ctx.sample_ndjson
        ctype = "application/json" if self.batch == 1 else "application/x-ndjson"
        code, resp = http("POST", self.url, body, ctype)
        if 200 <= code < 300:
            return True, f"smoke POST -> {code} {resp[:200]!r}"
        return False, f"smoke POST -> {code} {resp[:300]!r}"

    def stop(self) -> None:
        for p in reversed(self.procs):
            was_alive = p.alive()
            rc = p.stop()
            allowed = (0,) if self.clean_exit_required else (0, -signal.SIGTERM, None)
            if was_alive and rc not in allowed:
                self.notes.append(f"{p.name} exited with status {rc} on SIGTERM")


class Nginx(Target):
    name = "nginx"
    status_hook = False

    def start(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="nginx-", dir=self.ctx.workdir))
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=self.port))
        shutil.copy(conf, self.ctx.results / "nginx.conf")
        self.procs.append(Proc("nginx", ["taskset", "-c", SERVER_CORE, nginx_bin(), "-p", tmp, "-c", conf,
                                         "-e", tmp / "nginx-error.log"],
                               self.ctx.results / "nginx.log"))
        if not wait_tcp(self.port, self.procs[0], 10):
            raise RuntimeError("nginx did not start: " + self.procs[0].tail())


class TwistedWeb(Target):
    name = "twisted-web"

    def start(self) -> None:
        p = Proc("twisted-web", ["taskset", "-c", SERVER_CORE, VENV_PY, BENCH / "ref_twisted_web.py",
                                 str(self.port)],
                 self.ctx.results / "twisted-web.log", cwd=ROOT)
        self.procs.append(p)
        if not wait_tcp(self.port, p, 15):
            raise RuntimeError("ref_twisted_web did not start: " + p.tail())


class KleinRef(TwistedWeb):
    name = "klein"

    def start(self) -> None:
        p = Proc("klein", ["taskset", "-c", SERVER_CORE, VENV_PY, BENCH / "ref_klein.py", str(self.port)],
                 self.ctx.results / "klein.log", cwd=ROOT)
        self.procs.append(p)
        if not wait_tcp(self.port, p, 15):
            raise RuntimeError("ref_klein did not start: " + p.tail())


class Naive(Target):
    name = "naive"
    redis_key = "naive_leads"

    def start(self) -> None:
        self.ctx.redis.cli("DEL", self.redis_key)
        opts = []
        if venv_has("uvloop"):
            opts += ["--loop", "uvloop"]
        if venv_has("httptools"):
            opts += ["--http", "httptools"]
        self.notes.append("uvicorn " + (" ".join(opts) or "with its default loop/http (uvloop/httptools not installed)"))
        env = dict(os.environ, REDIS_URL=self.ctx.redis.url, NAIVE_LIST=self.redis_key)
        p = Proc("naive", ["taskset", "-c", SERVER_CORE, VENV_PY, "-m", "uvicorn", "ref_naive_starlette:app",
                           "--app-dir", BENCH, "--host", "127.0.0.1", "--port", str(self.port),
                           "--workers", "1", "--no-access-log", "--log-level", "warning", *opts],
                 self.ctx.results / "naive.log", env=env, cwd=ROOT)
        self.procs.append(p)
        if not wait_tcp(self.port, p, 20):
            raise RuntimeError("uvicorn did not start: " + p.tail())


class Relayd(Target):
    name = "relayd-stored"
    ack = "stored"
    redis_key = "leads"
    clean_exit_required = True

    def start(self) -> None:
        self.ctx.redis.cli("DEL", self.redis_key)
        d = Path(tempfile.mkdtemp(prefix=self.name + "-", dir=self.ctx.workdir))
        self.admin = free_port()
        conf = d / "relayd.conf"
        conf.write_text(RELAYD_CONF.format(port=self.port, admin=self.admin, redis_url=self.ctx.redis.url,
                                           spool=d / "spool", ack=self.ack))
        shutil.copy(conf, self.ctx.results / f"{self.name}.conf")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        cmd = ["taskset", "-c", SERVER_CORE, TWISTD, "-n", "--pidfile=", "relayd", "--config", conf]
        self.cmdline = shlex.join(str(c) for c in cmd)
        p = Proc(self.name, cmd, self.ctx.results / f"{self.name}.log", env=env, cwd=d)
        self.procs.append(p)
        deadline = time.monotonic() + self.ctx.args.relayd_start_timeout
        last = ""
        while time.monotonic() < deadline:
            if not p.alive():
                last_line = next((x for x in reversed(p.tail(40).splitlines()) if x.strip()), "")
                raise RuntimeError(f"relayd exited with status {p.p.returncode} at start-up: {last_line.strip()}"
                                   f"\n{p.tail()}")
            code, body = http("GET", f"http://127.0.0.1:{self.admin}/readyz", timeout=2)
            last = f"GET /readyz -> {code} {body[:200]!r}"
            if code == 200:
                return
            time.sleep(0.25)
        raise RuntimeError(f"relayd not ready after {self.ctx.args.relayd_start_timeout}s ({last})\n{p.tail()}")


class RelaydAccepted(Relayd):
    name = "relayd-accepted"
    ack = "accepted"


class RelaydNdjson(Relayd):
    name = "relayd-ndjson"
    script = "bench/ndjson.lua"
    batch = BATCH_LINES


class RelaydNdjsonAccepted(RelaydNdjson):
    name = "relayd-ndjson-accepted"
    ack = "accepted"


class _Paced:
    """Mixin: the same server under a paced load of about --paced-rate req/s."""

    script = "bench/post_paced.lua"
    ctx: Ctx

    def pace_ms(self) -> float | None:
        return 1000.0 * self.ctx.args.connections / self.ctx.args.paced_rate


class TwistedWebPaced(_Paced, TwistedWeb):
    name = "twisted-web-paced"


class RelaydStoredPaced(_Paced, Relayd):
    name = "relayd-stored-paced"


TARGET_CLASSES = {c.name: c for c in (Nginx, TwistedWeb, KleinRef, Naive, Relayd, RelaydAccepted, RelaydNdjson,
                                       RelaydNdjsonAccepted, TwistedWebPaced, RelaydStoredPaced)}


# --------------------------------------------------------------------------
# Profiling (py-spy)
# --------------------------------------------------------------------------


def _frame_path(frame: str) -> str:
    m = re.search(r"\(([^()]*?)(?::\d+)?\)$", frame)
    path = m.group(1) if m else frame
    return "/" + path.lstrip("/")


CATEGORIES = [
    # (label, predicate on the frame's file path, which py-spy shortens to
    # e.g. "/twisted/web/http.py"); first match wins. Time inside C calls
    # (socket send/recv, epoll_ctl, ujson) is charged to the Python frame
    # that made the call.
    ("Klein (routing, request/response wrappers)", lambda p: "/klein/" in p or "/werkzeug/" in p),
    ("twisted.web HTTP parsing/writing (http.py, server.py, resource.py, http_headers.py)",
     lambda p: "/twisted/web/" in p),
    ("Redis client (txredisapi / redis-py)", lambda p: "/txredisapi" in p or "/redis/" in p),
    ("JSON (json/ujson), JSON Schema", lambda p: "/json/" in p or "ujson" in p or "fastjsonschema" in p
                                        or "jsonschema_rs" in p),
    ("email/cgi Content-Type parsing", lambda p: "/email/" in p or p.endswith("/cgi.py")),
    ("Twisted reactor + TCP transport (twisted/internet, python, protocols, logger)",
     lambda p: any(x in p for x in ("/twisted/internet/", "/twisted/python/", "/twisted/protocols/",
                                    "/twisted/logger/", "/twisted/application/", "/twisted/scripts/"))),
    ("relayd's own code (relayd/)", lambda p: "/relayd/" in p),
    ("bench reference app (render_POST incl. its ujson.loads call)", lambda p: "ref_twisted_web" in p),
]


def categorize(frame: str) -> str:
    path = _frame_path(frame)
    for label, pred in CATEGORIES:
        if pred(path):
            return label
    return "other (stdlib, attrs, zope, ...)"


def short_frame(frame: str) -> str:
    # py-spy raw frames look like "funcname (path/to/file.py:123)"
    m = re.match(r"^(.*) \((.*?)(?::(\d+))?\)$", frame)
    if not m:
        return frame
    func, path = m.group(1), m.group(2)
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


# Leaf frames of threads that are blocked, not running (py-spy's own idle
# detection misses some futex waits, e.g. Twisted's thread pool workers).
IDLE_LEAVES = ("Condition.wait (threading.py", "Event.wait (threading.py", "Queue.get (queue.py",
               "_wait_for_tstate_lock (threading.py")


# Sub-trees worth a breakdown of their own, per profiled target: the share of
# samples under a frame whose text contains the anchor, and the leaf
# functions inside it.
PROFILE_ANCHORS = {
    "klein": ["KleinResource.render (", "Deferred.addCallback ("],
    "twisted-web": ["Ingest.render_POST ("],
    "relayd-stored": ["IngestRequest.process (", "IngestApp.serve (", "IngestApp._accept (", "KleinResource.render (",
                      "Forwarder", "RedisProtocol", "Spool"],
    "relayd-accepted": ["IngestRequest.process (", "IngestApp.serve (", "IngestApp._accept (", "Forwarder"],
    "relayd-ndjson": ["IngestApp._accept (", "BodyParser.parse (", "encode_envelopes (", "IdGenerator",
                      "Forwarder", "RedisProtocol", "Spool", "spool"],
}


def event_source(frames: list[str]) -> str:
    """What woke the reactor up for this sample: which protocol's
    dataReceived, a socket write, a timed call, or something else."""
    for i, f in enumerate(frames):
        if f.startswith("Connection._dataReceived (") and i + 1 < len(frames):
            return "dataReceived: " + short_frame(frames[i + 1])
        if f.startswith("ReactorBase.runUntilCurrent (") and i + 1 < len(frames):
            return "timed call: " + short_frame(frames[i + 1])
    for f in frames:
        if ".doWrite (" in f:
            return "socket write: " + short_frame(f)
        if f.startswith("Connection.doRead ("):
            return "socket read: Connection.doRead (twisted/internet/tcp.py)"
        if f.startswith("EPollReactor.doPoll (") and f is frames[-1]:
            return "epoll wait/dispatch"
    leaf = frames[-1] if frames else "?"
    return "other: " + short_frame(leaf)


def analyze_pyspy(raw: Path, top: int = 15, anchors: list[str] | None = None) -> dict:
    total = 0
    idle = 0
    self_t: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    cat_self: collections.Counter = collections.Counter()
    cat_incl: collections.Counter = collections.Counter()
    sources: collections.Counter = collections.Counter()
    anchors = anchors or []
    anchor_n: collections.Counter = collections.Counter()
    anchor_leaf: dict = {a: collections.Counter() for a in anchors}
    for line in raw.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, n = line.rpartition(" ")
        try:
            n = int(n)
        except ValueError:
            continue
        frames = stack.split(";")
        if frames and frames[0].startswith("process ") or frames and frames[0].startswith("thread "):
            frames = [f for f in frames if not (f.startswith(("process ", "thread ")))]
        if not frames:
            continue
        if any(w in frames[-1] for w in IDLE_LEAVES):
            idle += n
            continue
        total += n
        # py-spy raw/collapsed format is root-first: the last frame is the leaf
        self_t[short_frame(frames[-1])] += n
        cat_self[categorize(frames[-1])] += n
        seen = set()
        for f in frames:
            s = short_frame(f)
            if s not in seen:
                seen.add(s)
                incl[s] += n
        # Category "inclusive" only counts frames below the reactor loop, so
        # that the program's own main()/twistd start-up frames don't make a
        # category look 100%.
        loop = [i for i, f in enumerate(frames) if "ReactorBase.mainLoop" in f or "ReactorBase.run " in f]
        below = frames[loop[-1] + 1:] if loop else frames
        for c in {categorize(f) for f in below}:
            cat_incl[c] += n
        sources[event_source(frames)] += n
        for a in anchors:
            if any(a in f for f in frames):
                anchor_n[a] += n
                anchor_leaf[a][short_frame(frames[-1])] += n
    pct = (lambda v: 100.0 * v / total) if total else (lambda v: 0.0)
    return {
        "samples": total,
        "idle_samples": idle,
        "self": [(f, pct(v)) for f, v in self_t.most_common(top)],
        "self_full": {f: pct(v) for f, v in self_t.items()},
        "inclusive": [(f, pct(v)) for f, v in incl.most_common(top + 10)],
        "cat_self": [(c, pct(v)) for c, v in cat_self.most_common()],
        "cat_incl": [(c, pct(v)) for c, v in cat_incl.most_common()],
        "sources": [(c, pct(v)) for c, v in sources.most_common(12)],
        "anchors": [(a, pct(anchor_n[a]), [(f, pct(v)) for f, v in anchor_leaf[a].most_common(10)])
                    for a in anchors if anchor_n[a]],
    }


def profile_target(ctx: Ctx, cls, duration: int) -> dict:
    t = cls(ctx)
    log(f"profile {t.name}: starting")
    t.start()
    try:
        ok, why = t.ready()
        if not ok:
            raise RuntimeError(why)
        wait_for_quiet(ctx, f"profile {t.name}")
        run_wrk(t.url, t.script, ctx.args.warmup, ctx.args.connections,
                ctx.results / f"profile-{t.name}-warmup.txt")
        raw = ctx.results / f"profile-{t.name}.pyspy.txt"
        pids = [p.pid for p in t.procs]
        # py-spy shares core 1 with wrk so core 0 stays the server's alone.
        spy = subprocess.Popen(["taskset", "-c", LOAD_CORE, str(PYSPY), "record", "--format", "raw",
                                "--rate", "250", "--duration", str(duration), "--subprocesses",
                                "--output", str(raw), "--pid", str(pids[0])],
                               stdout=open(ctx.results / f"profile-{t.name}.pyspy.log", "wb"),
                               stderr=subprocess.STDOUT)
        time.sleep(0.5)
        w = run_wrk(t.url, t.script, duration, ctx.args.connections, ctx.results / f"profile-{t.name}-wrk.txt",
                    server=t.procs)
        try:
            spy.wait(duration + 30)
        except subprocess.TimeoutExpired:
            spy.terminate()
            spy.wait(10)
        if spy.returncode != 0 or not raw.exists():
            raise RuntimeError("py-spy failed: " + (ctx.results / f"profile-{t.name}.pyspy.log").read_text()[-500:])
        res = analyze_pyspy(raw, anchors=PROFILE_ANCHORS.get(t.name))
        res["rps_under_profiler"] = w["rps"]
        # CPU microseconds per request of the server process, so that two
        # profiles can be compared per request rather than per sample.
        cpu_frac = (w["server_cpu_pct"][0] if w["server_cpu_pct"] else 100.0) / 100.0
        res["server_cpu_pct"] = 100 * cpu_frac
        res["us_per_req"] = cpu_frac / w["rps"] * 1e6 if w["rps"] else None
        res["raw"] = str(raw.relative_to(ROOT))
        return res
    finally:
        t.stop()


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------


class Ctx:
    def __init__(self, args, workdir: Path, results: Path):
        self.args = args
        self.workdir = workdir
        self.results = results
        self.redis: Redis | None = None
        self.quiet_budget = float(args.quiet_budget)
        head, tail = '{"message":"this is a lead message ', '","shop":"a23m07b23"}'
        self.sample_body = (head + "x" * (200 - len(head) - len(tail)) + tail).encode()
        self.sample_ndjson = b"\n".join([self.sample_body] * 3) + b"\n"


RELAYD_COUNTERS = ("relayd_ingested_total", "relayd_forwarded_total", "relayd_spilled_total",
                   "relayd_replayed_total", "relayd_rejected_total")


def parse_metrics(text: str) -> dict:
    """Sum the few relayd counters the report shows (over all label sets)."""
    out: dict = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+([-+\d.eE]+|NaN)$", line.strip())
        if m and m.group(1) in RELAYD_COUNTERS:
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                pass
    return out


def wait_for_quiet(ctx: Ctx, tag: str) -> float:
    """Wait (bounded) until the rest of the box is quiet: other engineers'
    test suites share these 2 cores and can halve a Python server's rate.
    Returns the last 1-second reading of busy CPU in % of one core."""
    a = ctx.args
    deadline = time.monotonic() + min(a.quiet_wait, max(0.0, ctx.quiet_budget))
    t0 = time.monotonic()
    while True:
        s0 = proc_stat()
        time.sleep(1.0)
        busy = sum(c["busy"] for c in core_usage(s0, proc_stat()).values())
        if busy <= a.quiet_threshold or time.monotonic() >= deadline:
            break
        if time.monotonic() - t0 < 1.5:
            log(f"{tag}: box busy ({busy:.0f}% of a core used by others); waiting up to "
                f"{deadline - time.monotonic():.0f}s for <= {a.quiet_threshold:.0f}%")
    ctx.quiet_budget -= time.monotonic() - t0
    return busy


def measure(ctx: Ctx, name: str, rnd: int) -> dict:
    cls = TARGET_CLASSES[name]
    t = cls(ctx)
    tag = f"{name}-r{rnd}"
    row: dict = {"name": name, "round": rnd, "desc": TARGETS_TEXT[name], "batch": t.batch, "notes": t.notes}
    log(f"{tag}: starting server")
    try:
        t.start()
        ok, why = t.ready()
        if not ok:
            raise RuntimeError(why)
        if getattr(t, "cmdline", None):
            row["server_cmd"] = t.cmdline
        log(f"{tag}: {why}")
        row["pre_other_cpu_pct"] = wait_for_quiet(ctx, tag)
        log(f"{tag}: warm-up {ctx.args.warmup}s")
        run_wrk(t.url, t.script, ctx.args.warmup, ctx.args.connections, ctx.results / f"{tag}-warmup.txt",
                status_hook=t.status_hook, pace_ms=t.pace_ms())
        if t.redis_key:
            ctx.redis.settle(t.redis_key, quiet=0.5, limit=15)
            ctx.redis.cli("DEL", t.redis_key)
            time.sleep(0.2)
            stray = ctx.redis.settle(t.redis_key, quiet=0.5, limit=15)
            if stray:
                ctx.redis.cli("DEL", t.redis_key)
        servers = list(t.procs) + ([ctx.redis.proc] if t.redis_key else [])
        log(f"{tag}: measuring {ctx.args.duration}s")
        r = run_wrk(t.url, t.script, ctx.args.duration, ctx.args.connections, ctx.results / f"{tag}.txt",
                    server=servers, status_hook=t.status_hook, pace_ms=t.pace_ms())
        if t.redis_key:
            # what had reached Redis when the load stopped (vs what was acked)
            row["llen_at_end"] = ctx.redis.llen(t.redis_key)
        row.update(r)
        row["server_cpu_pct_app"] = r["server_cpu_pct"][0] if r["server_cpu_pct"] else None
        row["server_cpu_pct_redis"] = r["server_cpu_pct"][1] if len(r["server_cpu_pct"]) > 1 else None
        row["msgs_per_s"] = row["ok"] * t.batch / (r["duration_us"] / 1e6)
        if t.redis_key:
            t_end = time.monotonic()
            n = ctx.redis.settle(t.redis_key, quiet=1.0, limit=60)
            # time from wrk's end until the list stopped growing (minus the 1 s quiet window)
            row["drain_s"] = max(0.0, time.monotonic() - t_end - 1.0)
            row["llen"] = n
            expect_lo = row["ok"] * t.batch
            expect_hi = (row["ok"] + ctx.args.connections) * t.batch
            row["llen_expected"] = (expect_lo, expect_hi)
            row["llen_ok"] = expect_lo <= n <= expect_hi
            admin = getattr(t, "admin", None)
            if admin:
                code, text = http("GET", f"http://127.0.0.1:{admin}/metrics", timeout=5)
                (ctx.results / f"{tag}-metrics.txt").write_bytes(text)
                row["relayd_metrics"] = parse_metrics(text.decode(errors="replace")) if code == 200 else {}
            sample = ctx.redis.cli("LINDEX", t.redis_key, "0")
            row["sample_item"] = sample[:400]
            ctx.redis.cli("DEL", t.redis_key)
        problems = []
        if row["non2xx"]:
            codes = ", ".join(f"{n} x {c}" for c, n in sorted(r.get("statuses", {}).items()) if not c.startswith("2"))
            problems.append(f"{row['non2xx']} non-2xx responses" + (f" ({codes})" if codes else ""))
        if row["sock_errors"]:
            problems.append(f"socket errors connect/read/write/timeout = {r['err_connect']}/{r['err_read']}/"
                            f"{r['err_write']}/{r['err_timeout']}")
        if t.redis_key and not row["llen_ok"]:
            problems.append(f"Redis LLEN {row['llen']} outside expected {row['llen_expected']}")
        for p in t.procs:
            if not p.alive():
                problems.append(f"{p.name} died during the run (status {p.p.returncode})")
        row["problems"] = problems
        row["valid"] = not problems
        log(f"{tag}: {row['rps']:.0f} req/s, p50 {row['lat_p50_us']}us p99 {row['lat_p99_us']}us, "
            f"non2xx {row['non2xx']}, cpu {['%.0f%%' % c for c in r['server_cpu_pct']]}, "
            f"wrk {r['wrk_cpu_pct']:.0f}%" + (f", LLEN {row['llen']}" if t.redis_key else "")
            + ("" if row["valid"] else f"  INVALID: {problems}"))
    except Exception as e:  # noqa: BLE001 - a broken target must not sink the others
        row["error"] = str(e)
        row["valid"] = False
        log(f"{tag}: NOT MEASURED: {e}")
    finally:
        t.stop()
    return row


def aggregate(all_rows: list[dict], targets: list[str]) -> list[dict]:
    """One row per target: the round with the median req/s, plus the spread
    and every round's problems."""
    out = []
    for name in targets:
        rr = [r for r in all_rows if r["name"] == name]
        measured = sorted((r for r in rr if "error" not in r), key=lambda r: r["rps"])
        if not measured:
            agg = dict(rr[0])
            agg["rounds"] = len(rr)
            out.append(agg)
            continue
        agg = dict(measured[(len(measured) - 1) // 2])
        agg["rounds"] = len(rr)
        agg["rounds_measured"] = len(measured)
        agg["rps_min"], agg["rps_max"] = measured[0]["rps"], measured[-1]["rps"]
        agg["msgs_max"] = max(r["msgs_per_s"] for r in measured)
        # CPU-normalised rate: req/s per core-second the server (+ its Redis,
        # which shares core 0) actually got. Robust to other processes
        # stealing core 0, because time spent preempted costs no CPU; but it
        # over-states what a server that idles waiting on I/O could reach.
        norms = sorted(r["rps"] / (sum(r["server_cpu_pct"]) / 100) for r in measured
                       if r.get("server_cpu_pct") and sum(r["server_cpu_pct"]) > 5)
        if norms:
            agg["rps_cpu_norm"] = norms[(len(norms) - 1) // 2]
            agg["msgs_cpu_norm"] = agg["rps_cpu_norm"] * agg["batch"]
        agg["non2xx_total"] = sum(r["non2xx"] for r in measured)
        agg["foreign_max"] = max(r["foreign_cpu_pct"] for r in measured)
        agg["steal_max"] = max(r.get("steal_pct", 0.0) for r in measured)
        problems = []
        for r in rr:
            if "error" in r:
                problems.append(f"round {r['round']}: not measured: {r['error'].splitlines()[0]}")
            for pr in r.get("problems", []):
                problems.append(f"round {r['round']}: {pr}")
        agg["problems"] = problems
        agg["valid"] = not problems
        if any("llen_ok" in r for r in measured):
            agg["llen_ok"] = all(r.get("llen_ok") for r in measured)
        out.append(agg)
    return out


def cmd_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or \
            subprocess.run(cmd, capture_output=True, text=True, timeout=10).stderr.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_info() -> dict:
    lscpu = cmd_output(["lscpu"])
    model = re.search(r"^Model name:\s*(.*)$", lscpu, re.M)
    virt = re.search(r"^Hypervisor vendor:\s*(.*)$", lscpu, re.M)
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, AttributeError):
        pass
    pkgs = ["Twisted", "klein", "ujson", "txredisapi", "starlette", "uvicorn", "uvloop", "httptools", "redis",
            "py-spy"]
    code = ("import importlib.metadata as m, json, sys, platform\n"
            f"out={{'python': platform.python_implementation()+' '+sys.version.split()[0]}}\n"
            f"for p in {pkgs!r}:\n"
            "    try: out[p]=m.version(p)\n"
            "    except Exception: out[p]='not installed'\n"
            "print(json.dumps(out))")
    versions = json.loads(subprocess.run([str(VENV_PY), "-c", code], capture_output=True, text=True).stdout)
    git = cmd_output(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s", "--", "relayd", "twisted", "setup.py"])
    dirty = cmd_output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "relayd", "twisted"])
    return {
        "cpu": model.group(1) if model else platform.processor(),
        "hypervisor": virt.group(1) if virt else "none reported",
        "cores": os.cpu_count(),
        "mem": mem,
        "kernel": platform.release(),
        "os": cmd_output(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "versions": versions,
        "nginx": cmd_output([nginx_bin(), "-v"]).replace("nginx version: ", ""),
        "redis": cmd_output(["redis-server", "--version"]).split(" sha=")[0],
        "wrk": cmd_output(["wrk", "--version"]).splitlines()[0].split(" Copyright")[0] if shutil.which("wrk") else "?",
        "git": git,
        "relayd_dirty": bool(dirty),
    }


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def fmt_us(us) -> str:
    if us is None:
        return "–"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def ratio(a: dict | None, b: dict | None, key: str = "rps") -> float | None:
    if not a or not b or key not in a or not b.get(key):
        return None
    return a[key] / b[key]


def render(ctx: Ctx, rows: list[dict], all_rows: list[dict], info: dict, profiles: dict, started: str,
           took: float) -> str:
    a = ctx.args
    by = {r["name"]: r for r in rows}
    L: list[str] = []
    w = L.append
    w("# relayd benchmarks")
    w("")
    w("<!-- Generated by bench/run.py; re-run `bench/run.sh` to refresh. Hand edits above the END OF GENERATED "
      "PART marker are overwritten; put hand-written sections below it (they are kept). -->")
    w("")
    git = info["git"] if len(info["git"]) <= 110 else info["git"][:107] + "..."
    w(f"Run: {started} (UTC), {took:.0f} s wall. relayd code: last commit touching relayd/ `{git}`"
      + (" **plus uncommitted changes in relayd/**" if info["relayd_dirty"] else "") + ".")
    w("")
    w("## Command")
    w("")
    w("```sh")
    w(a.invocation)
    w("```")
    w("")
    w("Per target, a fresh server is started on core 0, warmed up for "
      f"{a.warmup} s, then measured with:")
    w("")
    w("```sh")
    w(shlex.join(wrk_cmd("http://127.0.0.1:PORT/leads", "bench/post.lua", a.duration, a.connections)))
    w(f"# NDJSON rows: same with -s bench/ndjson.lua ({BATCH_LINES} lines of ~200 B per request)")
    w("```")
    w("")
    if "relayd-stored" in by and by["relayd-stored"].get("server_cmd"):
        w("relayd was started as:")
        w("")
        w("```sh")
        cmd = re.sub(r"--config \S+", "--config relayd.conf", by["relayd-stored"]["server_cmd"])
        w(f"PYTHONPATH={ROOT} {cmd}")
        w("```")
        w("")
        w("with this generated `relayd.conf` (free ports picked per run; `ack = \"accepted\"` for the accepted "
          "rows; copies in bench/results/<run>/):")
        w("")
        w("```toml")
        w(RELAYD_CONF.format(port="PORT", admin="ADMIN_PORT", redis_url="redis://127.0.0.1:REDIS_PORT/0",
                             spool="<temp dir>/spool", ack="stored").strip())
        w("```")
        w("")
    w("## Machine")
    w("")
    v = info["versions"]
    w(f"- CPU: {info['cpu']}, {info['cores']} cores (hypervisor: {info['hypervisor']}), {info['mem']} RAM")
    w(f"- Kernel {info['kernel']}, {info['os']}")
    w(f"- {v['python']}; Twisted {v['Twisted']}, Klein {v['klein']}, ujson {v['ujson']}, "
      f"txredisapi {v['txredisapi']}")
    w(f"- Naive app: Starlette {v['starlette']}, uvicorn {v['uvicorn']}, uvloop {v['uvloop']}, "
      f"httptools {v['httptools']}, redis-py {v['redis']}")
    w(f"- nginx {info['nginx']}, {info['redis']}, {info['wrk']}")
    w(f"- Placement: server under test **and Redis** on core 0 (`taskset -c {SERVER_CORE}`), wrk (and py-spy) on "
      f"core 1 (`taskset -c {LOAD_CORE}`). Redis shares core 0 because the load generator owns core 1, "
      "so for the Redis-backed rows the app's throughput includes paying for Redis's CPU.")
    w("")
    w("## Results")
    w("")
    w(f"Body: one ~200 B JSON lead per request (`{ctx.sample_body[:60].decode()}...`), keep-alive, "
      f"{a.connections} connections, {a.duration} s per round, {a.rounds} interleaved round(s) "
      "(every target once per round, in order). Each row is the round with the median req/s; "
      "the range is min–max over rounds; p50/p99 and CPU are from the median round; non-2xx is summed over "
      "all rounds.")
    w("")
    w("| target | req/s (median) | range | msgs/s | req/s per core (CPU-norm.) | p50 | p99 | p99.9 | non-2xx | server CPU "
      "| Redis CPU | wrk CPU | other CPU / steal (max) | valid |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if "rps" not in r:
            w(f"| {r['desc']} | not measured | | | | | | | | | | | | **no**: {r['error'].splitlines()[0][:200]} |")
            continue
        red = f"{r['server_cpu_pct_redis']:.0f}%" if r.get("server_cpu_pct_redis") is not None else "–"
        cn = f"{r['rps_cpu_norm']:,.0f}" if r.get("rps_cpu_norm") else "–"
        w(f"| {r['desc']} | {r['rps']:,.0f} | {r['rps_min']:,.0f}–{r['rps_max']:,.0f} | {r['msgs_per_s']:,.0f} | {cn} | "
          f"{fmt_us(r['lat_p50_us'])} | {fmt_us(r['lat_p99_us'])} | {fmt_us(r.get('lat_p999_us'))} | {r['non2xx_total']} | "
          f"{r['server_cpu_pct_app']:.0f}% | {red} | {r['wrk_cpu_pct']:.0f}% | {r['foreign_max']:.0f}% / {r.get('steal_max', 0):.0f}% | "
          f"{'yes' if r['valid'] else '**NO**: ' + '; '.join(r['problems'])[:600]} |")
    w("")
    w("*other CPU* = CPU used on the box by anything but the server, Redis and wrk during the run, in % of one "
      "core (other people's test suites share this machine). Above ~10% the row is disturbed: compare rounds. "
      "*steal* = CPU time the hypervisor gave to other VMs (both cores added up). "
      "*req/s per core (CPU-norm.)* = req/s divided by the CPU the server (plus Redis, which shares core 0) "
      "actually got, median over rounds: what the server would do with core 0 to itself. It is robust to "
      "neighbours stealing core 0, but over-states a server that idles waiting on I/O, and for nginx the "
      "limit is wrk, not nginx.")
    w("")
    w("### Ratios (same run)")
    w("")
    w("*median* divides the median rounds; *best* divides the best rounds. Interference from other "
      "processes on this shared box only ever slows a server down, so *best* is the better estimate of "
      "capacity and *median* the conservative one; the verdict uses the median.")
    w("")
    w("*CPU-norm.* divides the CPU-normalised rates (see above): the least noise-sensitive of the three on "
      "a busy box.")
    w("")
    w("| ratio | median | best | CPU-norm. | target | verdict |")
    w("|---|---:|---:|---:|---:|---|")

    def best(r: dict | None, key: str) -> dict | None:
        if not r or key not in r:
            return None
        return {key: r["rps_max" if key == "rps" else "msgs_max"]}

    def rrow(label, num, den, target=None):
        med = ratio(by.get(num), by.get(den))
        bst = ratio(best(by.get(num), "rps"), best(by.get(den), "rps"))
        cpu = ratio(by.get(num), by.get(den), "rps_cpu_norm")
        cpu_s = f"{cpu:.2f}x" if cpu else "–"
        tgt = f">= {target:.2f}x" if target else "–"
        if med is None:
            w(f"| {label} | n/a | n/a | n/a | {tgt} | not measured |")
            return
        bad = [n for n in (num, den) if not by[n].get("valid")]
        verdict = "" if target is None else ("meets" if med >= target else "**misses**")
        if target is not None and med < target <= max(bst, cpu or 0):
            verdict += " (best round or CPU-norm. meets)"
        if bad:
            verdict += f" — {', '.join(bad)} invalid"
        w(f"| {label} | {med:.2f}x | {bst:.2f}x | {cpu_s} | {tgt} | {verdict} |")

    # Issue 13's bars: stored >= 0.85x and accepted >= 0.9x raw twisted.web; NDJSON stored >= 300k msgs/s.
    for mode, bar in (("stored", 0.85), ("accepted", 0.9)):
        rel = f"relayd-{mode}"
        rrow(f"relayd ({mode}) / raw twisted.web", rel, "twisted-web", bar)
        rrow(f"relayd ({mode}) / naive Starlette", rel, "naive", 2.2)
        rrow(f"relayd ({mode}) / nginx", rel, "nginx")
    rrow("raw twisted.web / nginx", "twisted-web", "nginx")
    rrow("Klein-routed / raw twisted.web (Klein's cost)", "klein", "twisted-web")
    rrow("naive / raw twisted.web", "naive", "twisted-web")
    for n in ("relayd-ndjson", "relayd-ndjson-accepted"):
        r = by.get(n)
        if r is None:
            continue
        label = f"NDJSON batch msgs/s into Redis ({'stored' if n == 'relayd-ndjson' else 'accepted'}, 1 core)"
        bar = 300_000 if n == "relayd-ndjson" else 250_000
        if "msgs_per_s" not in r:
            w(f"| {label} | n/a | n/a | n/a | >= {bar:,} | not measured |")
            continue
        val, bst = r["msgs_per_s"], r["msgs_max"]
        cpu_s = f"{r['msgs_cpu_norm']:,.0f}" if r.get("msgs_cpu_norm") else "–"
        verdict = "meets" if val >= bar else "**misses**"
        if not r.get("valid"):
            verdict += " — invalid (see Results)"
        w(f"| {label} | {val:,.0f} | {bst:,.0f} | {cpu_s} | >= {bar:,} | {verdict} |")
    w("")
    redis_rows = [r for r in all_rows if "llen" in r]
    if redis_rows:
        w("### Redis check")
        w("")
        w("After each Redis-backed run the list length is read once it stopped changing and compared with what "
          "wrk saw acknowledged (2xx responses x lines per request). Up to one request per connection may be "
          "in flight when wrk stops, so LLEN may exceed the acknowledged count by at most "
          f"{a.connections} x lines; it must never be lower (that would be an acknowledged message lost).")
        w("")
        w("relayd's own counters (from its admin `/metrics`, whole process life incl. warm-up and smoke test) "
          "show which path the messages took: straight to Redis (*forwarded*) or through the disk spool "
          "(*spilled*, then *replayed*).")
        w("")
        w("*in Redis at end* = LLEN the moment wrk finished, as msgs/s over the run: the rate at which "
          "messages actually landed in Redis while under load (for stored acks ~ the acked rate; for accepted "
          "acks it can be far lower when messages are parked in the spool). *drain* = seconds from the end of "
          "the wrk run until LLEN stopped growing.")
        w("")
        w("| target | round | acknowledged msgs | LLEN | ok | in Redis at end (msgs/s) | drain | relayd ingested "
          "| forwarded | spilled | replayed |")
        w("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")

        def cnt(r, k):
            v = r.get("relayd_metrics", {}).get(k)
            return "–" if v is None else f"{v:,.0f}"
        for r in redis_rows:
            w(f"| {r['name']} | {r['round']} | {r['ok'] * r['batch']:,} | {r['llen']:,} | "
              f"{'yes' if r['llen_ok'] else '**NO**'} | "
              + (f"{r['llen_at_end']:,} ({r['llen_at_end'] / (r['duration_us'] / 1e6):,.0f}/s)"
                 if "llen_at_end" in r else "–")
              + f" | {r.get('drain_s', 0):.1f} s | "
              f"{cnt(r, 'relayd_ingested_total')} | "
              f"{cnt(r, 'relayd_forwarded_total')} | {cnt(r, 'relayd_spilled_total')} | "
              f"{cnt(r, 'relayd_replayed_total')} |")
        w("")
        sample = next((r["sample_item"] for r in redis_rows if r["name"].startswith("relayd") and r.get("sample_item")),
                      None)
        if sample:
            w("A relayd item as it landed in Redis (truncated):")
            w("")
            w("```")
            w(sample[:300])
            w("```")
            w("")
    if a.findings_notes and Path(a.findings_notes).exists():
        w(Path(a.findings_notes).read_text().strip())
        w("")
    notes = sorted({(r["name"], n) for r in all_rows for n in r.get("notes", [])})
    if notes:
        w("Notes: " + "; ".join(f"{n}: {x}" for n, x in notes) + ".")
        w("")
    if profiles:
        w("## Profile")
        w("")
        w("py-spy sampled the server under the same single-message load (`py-spy record --format raw --rate 250 "
          "--subprocesses`, idle time excluded, py-spy on core 1 with wrk). Percentages are of on-CPU Python "
          "samples. *Self* = the frame was the leaf (time spent in that function itself); *inclusive* = the frame "
          "was anywhere on the stack. Categories are by file: a frame in `klein/` counts as Klein, `twisted/web/` "
          "as twisted.web, and so on. Raw stacks: bench/results/<run>/profile-*.pyspy.txt (load them in "
          "speedscope or `flamegraph.pl`).")
        w("")
        for name, p in profiles.items():
            w(f"### {TARGETS_TEXT.get(name, name)}")
            w("")
            if "error" in p:
                w(f"Not profiled: {p['error'][:300]}")
                w("")
                continue
            w(f"{p['samples']:,} on-CPU samples ({p.get('idle_samples', 0):,} samples of blocked threads, e.g. "
              f"thread-pool workers in Condition.wait, dropped); {p['rps_under_profiler']:,.0f} req/s while sampled.")
            w("")
            w("| category | self % | inclusive % |")
            w("|---|---:|---:|")
            incl = dict(p["cat_incl"])
            for c, s in p["cat_self"]:
                w(f"| {c} | {s:.1f} | {incl.get(c, 0):.1f} |")
            w("")
            w("Top functions by self time:")
            w("")
            w("| self % | function (file) |")
            w("|---:|---|")
            for f, s in p["self"][:15]:
                w(f"| {s:.1f} | `{f}` |")
            w("")
            w("By event source (what the reactor was handling when sampled):")
            w("")
            w("| % | source |")
            w("|---:|---|")
            for src, v in p.get("sources", []):
                w(f"| {v:.1f} | `{src}` |")
            w("")
            for a, share, leaves in p.get("anchors", []):
                w(f"Under `{a.strip(' (')}` ({share:.1f}% of samples), by leaf function (% of all samples):")
                w("")
                w("| % | leaf function (file) |")
                w("|---:|---|")
                for f, v in leaves:
                    w(f"| {v:.1f} | `{f}` |")
                w("")
            w("Top functions by inclusive time:")
            w("")
            w("| incl % | function (file) |")
            w("|---:|---|")
            for f, s in p["inclusive"][:25]:
                w(f"| {s:.1f} | `{f}` |")
            w("")
        for a_name, b_name in (("klein", "twisted-web"), ("relayd-stored", "twisted-web")):
            pa, pb = profiles.get(a_name, {}), profiles.get(b_name, {})
            if not pa.get("us_per_req") or not pb.get("us_per_req"):
                continue
            ua, ub = pa["us_per_req"], pb["us_per_req"]
            w(f"### Per-request diff: {a_name} vs {b_name}")
            w("")
            w(f"Server CPU per request while profiled: {a_name} {ua:.1f} µs, {b_name} {ub:.1f} µs "
              f"(difference {ua - ub:+.1f} µs). Self time per request by function, largest increases first "
              "(µs = self% x CPU per request; py-spy overhead inflates both sides alike):")
            w("")
            w(f"| function (file) | {a_name} µs | {b_name} µs | Δ µs |")
            w("|---|---:|---:|---:|")
            fa, fb = pa["self_full"], pb["self_full"]
            diffs = sorted(((fa.get(f, 0) * ua / 100 - fb.get(f, 0) * ub / 100, f) for f in set(fa) | set(fb)),
                           reverse=True)
            for d, f in diffs[:15]:
                w(f"| `{f}` | {fa.get(f, 0) * ua / 100:.2f} | {fb.get(f, 0) * ub / 100:.2f} | {d:+.2f} |")
            w("")
            cat_a, cat_b = dict(pa["cat_self"]), dict(pb["cat_self"])
            w("By category (self µs per request): " + "; ".join(
                f"{c.split(' (')[0]} {cat_a.get(c, 0) * ua / 100:.1f} vs {cat_b.get(c, 0) * ub / 100:.1f}"
                for c in sorted(set(cat_a) | set(cat_b), key=lambda c: -(cat_a.get(c, 0) * ua)) ) + ".")
            w("")
        if ctx.args.profile_notes and Path(ctx.args.profile_notes).exists():
            w(Path(ctx.args.profile_notes).read_text().strip())
            w("")
    w("## How to read this")
    w("")
    w("- **nginx** is the ceiling of this box and of a single wrk thread: nothing written in Python will come "
      "close. If wrk's CPU is near 100% on that row, the ceiling is the load generator, not nginx.")
    w("- **raw twisted.web** is the ceiling for any Twisted-based server that parses the JSON body: it does "
      "everything relayd must do per request except Redis, routing and durability. relayd at >= 0.8x of it "
      "means relayd's own machinery (Klein/routing, ids, envelope, buffering, Redis pipeline) costs <= 20%.")
    w("- **naive** is what a straightforward async app does: one Redis round trip per request before the 2xx. "
      "relayd >= 2.2x of it is the point of relayd's batching.")
    w("- **req/s** is wrk's completed requests / duration; **msgs/s** counts only 2xx x lines per request. "
      "p50/p99 are wrk's latency percentiles (coordinated omission not corrected: wrk waits for a response "
      "before sending the next request on a connection).")
    w("- A row with non-2xx responses, socket errors, a server that died, or a Redis count below the "
      "acknowledged count is **invalid** and its ratios mean nothing.")
    w("- Server CPU is the process group's CPU time over the run; Redis CPU is listed separately but shares "
      "core 0, so server + Redis close to 100% means core 0 was the bottleneck.")
    w("- This is a shared 2-core VM: other engineers' test suites run on the same cores. The harness waits "
      "(bounded) for the box to be quiet before each target and interleaves rounds, but a busy neighbour can "
      "still take 30-50% off a round: look at *other CPU* and the range, prefer ratios within one run over "
      "absolute numbers across runs, and re-run on a quiet box before drawing fine conclusions.")
    w("")
    return "\n".join(L)


KEEP_MARKER = ("<!-- END OF GENERATED PART. Everything below this line is written by hand and kept as is "
               "when bench/run.py rewrites the part above. -->")
GENERATED_H2 = {"## Command", "## Machine", "## Results", "## Profile", "## How to read this"}


def write_doc(path: Path, md: str) -> None:
    """Write the generated report, keeping hand-written sections that other
    people appended below it (below KEEP_MARKER, or, in a file written before
    the marker existed, any '## ' section after '## How to read this')."""
    keep = ""
    if path.exists():
        old = path.read_text()
        if KEEP_MARKER in old:
            keep = old.split(KEEP_MARKER, 1)[1].strip("\n")
        elif "## How to read this" in old:
            tail = old.split("## How to read this", 1)[1]
            m = re.search(r"^## (?!#)", tail, re.M)
            if m:
                keep = tail[m.start():].strip("\n")
    path.write_text(md.rstrip("\n") + "\n\n" + KEEP_MARKER + "\n\n" + (keep + "\n" if keep else ""))


def args_render_dir(saved: dict) -> str:
    return f"run of {saved.get('started')}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per measured run (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per target (default 3)")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--paced-rate", type=float, default=4000,
                    help="req/s offered by the *-paced targets (about half of relayd's stored peak here)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds over all targets; the median round is reported (default 3)")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS),
                    help=f"comma list, default all: {','.join(ALL_TARGETS)}")
    ap.add_argument("--quiet-threshold", type=float, default=15,
                    help="before each target, wait until the box's other CPU use is <= this %% of a core")
    ap.add_argument("--quiet-wait", type=float, default=60, help="max seconds to wait for quiet per target")
    ap.add_argument("--quiet-budget", type=float, default=600, help="max seconds of quiet-waiting per run")
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profile runs")
    ap.add_argument("--profile-targets", default="relayd-stored,relayd-ndjson,twisted-web,klein")
    ap.add_argument("--profile-duration", type=int, default=10)
    ap.add_argument("--profile-notes", default=str(BENCH / "profile_notes.md"),
                    help="markdown appended to the Profile section if the file exists")
    ap.add_argument("--findings-notes", default=str(BENCH / "findings_notes.md"),
                    help="markdown inserted after the Redis check if the file exists")
    ap.add_argument("--relayd-start-timeout", type=float, default=30)
    ap.add_argument("--doc", default=str(DOC), help="markdown file to write ('-' = stdout only)")
    ap.add_argument("--invocation", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--render-only", metavar="RESULTS_DIR", default=None,
                    help="don't measure: re-render docs from bench/results/<stamp>/rows.json")
    args = ap.parse_args()
    args.invocation = args.invocation or shlex.join(["python", "bench/run.py", *sys.argv[1:]])
    if args.render_only:
        # Re-render a finished run (e.g. after editing bench/profile_notes.md).
        saved = json.loads((Path(args.render_only) / "rows.json").read_text())
        notes, findings = args.profile_notes, args.findings_notes
        args = argparse.Namespace(**saved["args"])
        args.profile_notes, args.findings_notes = notes, findings
        ctx = Ctx(args, Path("/nonexistent"), Path(saved["args"].get("render_only") or "."))
        order = [r["name"] for r in saved["rows"]]
        md = render(ctx, aggregate(saved["all_rows"], order), saved["all_rows"], saved["machine"],
                    saved["profiles"], saved["started"], saved["took"])
        if saved["args"].get("doc", "-") != "-":
            write_doc(Path(saved["args"]["doc"]), md)
            log(f"re-rendered {saved['args']['doc']} from {args_render_dir(saved)}")
        print(md)
        return 0

    # Stop cleanly (servers, Redis, scratch dir) on Ctrl-C and on SIGTERM, even
    # when started in the background (where a shell leaves SIGINT ignored).
    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGTERM, _terminate)

    ensure_system_tools()
    ensure_python_deps()

    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = BENCH / "results" / stamp
    results.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="relayd-bench-"))
    ctx = Ctx(args, workdir, results)
    t0 = time.monotonic()
    log(f"results in {results.relative_to(ROOT)}, scratch in {workdir}")
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t not in TARGET_CLASSES:
            raise SystemExit(f"unknown target {t!r}; known: {', '.join(ALL_TARGETS)}")
    rows: list[dict] = []
    all_rows: list[dict] = []
    profiles: dict = {}
    try:
        if any(TARGET_CLASSES[t].redis_key for t in targets):
            ctx.redis = Redis(workdir, results)
        for rnd in range(1, args.rounds + 1):
            for t in targets:
                all_rows.append(measure(ctx, t, rnd))
        rows = aggregate(all_rows, targets)
        if not args.no_profile:
            for name in [p for p in args.profile_targets.split(",") if p]:
                if name.startswith("relayd") and not any(r["name"].startswith("relayd") and "error" not in r
                                                         for r in all_rows):
                    profiles[name] = {"error": "relayd did not run in this session"}
                    continue
                if TARGET_CLASSES[name].redis_key and ctx.redis is None:
                    ctx.redis = Redis(workdir, results)
                try:
                    profiles[name] = profile_target(ctx, TARGET_CLASSES[name], args.profile_duration)
                except Exception as e:  # noqa: BLE001
                    profiles[name] = {"error": str(e)}
                    log(f"profile {name} failed: {e}")
    finally:
        if ctx.redis:
            ctx.redis.proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    info = machine_info()
    md = render(ctx, rows, all_rows, info, profiles, started, time.monotonic() - t0)
    (results / "benchmarks.md").write_text(md)
    (results / "rows.json").write_text(json.dumps({"rows": rows, "all_rows": all_rows, "profiles": profiles,
                                                   "machine": info, "args": vars(args), "started": started,
                                                   "took": time.monotonic() - t0},
                                                  indent=1, default=str))
    if args.doc != "-":
        write_doc(Path(args.doc), md)
        log(f"wrote {args.doc}")
    print(md)
    invalid = [r["name"] for r in rows if not r.get("valid")]
    if invalid:
        log(f"INVALID or missing rows: {', '.join(invalid)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
