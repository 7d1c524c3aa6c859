#!/usr/bin/env python3
"""Route-schema cost, before (fastjsonschema) and after (jsonschema-rs), in ONE run.

    .venv/bin/python bench/schema_bench.py [--before REV] [--duration 8] [--rounds 2] [--no-http]

1. Per message, in this process: validating the shipped increment schema
   (etc/schemas/increment.json, draft 7 + ``format: uuid``) with
   fastjsonschema as relayd compiled it before, with jsonschema-rs as
   relayd compiles it now, and the same schema declared 2020-12; then
   ``BodyParser.parse`` of one increment body (parse + validate), now vs.
   the old ujson + fastjsonschema pair.
2. Stored POSTs over HTTP: ``twistd -n relayd`` from the old revision
   (`--before`, extracted with ``git archive``) and from this tree, each
   with a schema route (``/increments``, ack stored) and a schema-less
   route (``/leads``, the same-run reference), against one redis-server;
   wrk -t1 -c50 on core 1, servers and Redis on core 0 (as bench/run.py),
   rounds interleaved, the median round reported.

Needs fastjsonschema in the venv for the "before" side (installed here if
missing: it is no longer a relayd dependency). Only 127.0.0.1 is loaded and
every load run is bounded by wrk's -d.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # noqa: E402  (bench/run.py: Proc, Redis, run_wrk, http)

ROOT = harness.ROOT
INCREMENT_SCHEMA = ROOT / "etc" / "schemas" / "increment.json"
BODY = b'{"key":"6f1c3c56-2f0a-4c1f-9e4b-2a1c5b9d8e7f","value":42}'
LEAD = b'{"message":"this is a lead message","shop":"a23m07b23"}'


def log(msg: str) -> None:
    print(f"[schema-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_fastjsonschema() -> None:
    try:
        import fastjsonschema  # noqa: F401
    except ImportError:
        log("installing fastjsonschema into the venv (the 'before' reference)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "fastjsonschema>=2.19"], check=True)


def per_call_us(fn: Callable[[], Any], number: int = 100_000, repeat: int = 5) -> float:
    """Best of `repeat` timings of `number` calls, in microseconds per call."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def micro_worker(schema_path: str) -> None:
    """Run in a child whose PYTHONPATH holds one relayd tree: its own costs, as JSON on stdout."""
    import ujson

    from relayd.ingest.validation import BodyParser, compile_schema_file

    validator = compile_schema_file(schema_path, "bench")
    value = ujson.loads(BODY)
    check = getattr(validator, "is_valid", validator)  # after: RouteSchema.is_valid; before: the callable
    check(value)
    parser = BodyParser(validator)
    assert parser.parse(BODY, b"application/json").values == [value]
    out = {
        "validate_us": per_call_us(lambda: check(value)),
        "parse_us": per_call_us(lambda: parser.parse(BODY, b"application/json")),
    }
    if hasattr(validator, "is_valid"):
        from relayd.schema import compile_schema

        schema = json.loads(Path(schema_path).read_text())
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        as2020 = compile_schema(schema)
        out["validate_2020_us"] = per_call_us(lambda: as2020.is_valid(value))
        parser2020 = BodyParser(as2020)
        out["parse_2020_us"] = per_call_us(lambda: parser2020.parse(BODY, b"application/json"))
    print("MICROJSON " + json.dumps(out))


def micro(before_src: Path, rounds: int) -> Dict[str, Dict[str, float]]:
    """Per-message costs of both trees, in child processes, interleaved; best per side."""
    best: Dict[str, Dict[str, float]] = {}
    for _ in range(rounds):
        for side, src in (("before", before_src), ("after", ROOT)):
            env = dict(os.environ, PYTHONPATH=str(src))
            out = subprocess.run(
                ["taskset", "-c", harness.SERVER_CORE, sys.executable, __file__, "--micro-worker",
                 str(src / "etc" / "schemas" / "increment.json")],
                capture_output=True, text=True, env=env, cwd=str(src), timeout=600,
            )
            line = next((x for x in out.stdout.splitlines() if x.startswith("MICROJSON ")), None)
            if out.returncode != 0 or line is None:
                raise RuntimeError(f"micro {side} failed:\n{out.stdout}\n{out.stderr}")
            for key, us in json.loads(line[len("MICROJSON "):]).items():
                mine = best.setdefault(side, {})
                mine[key] = min(us, mine.get(key, us))
    return best


CONF = """\
[server]
listen = "tcp:{port}:interface=127.0.0.1"
admin = "tcp:{admin}:interface=127.0.0.1"
workers = 1

[redis]
url = "{redis_url}"

[spool]
dir = "{spool}"
fsync = "batch"

[[route]]
path = "/increments"
list = "increments"
schema = "{schema}"

[[route]]
path = "/leads"
list = "leads"
"""


def extract(rev: str, into: Path) -> Path:
    """The tree of `rev` (relayd/, twisted/plugins/, etc/) under `into`."""
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev, "relayd", "twisted", "etc"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "src")
    return into / "src"


def start_relayd(name: str, src: Path, redis: Any, work: Path, results: Path) -> tuple:
    d = Path(tempfile.mkdtemp(prefix=name + "-", dir=work))
    port, admin = harness.free_port(), harness.free_port()
    conf = d / "relayd.conf"
    conf.write_text(CONF.format(port=port, admin=admin, redis_url=redis.url, spool=d / "spool",
                                schema=src / "etc" / "schemas" / "increment.json"))
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = ["taskset", "-c", harness.SERVER_CORE, harness.TWISTD, "-n", "--pidfile=", "relayd", "--config", conf]
    proc = harness.Proc(name, cmd, results / f"{name}.log", env=env, cwd=d)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{name} exited at start-up:\n{proc.tail()}")
        if harness.http("GET", f"http://127.0.0.1:{admin}/readyz", timeout=2)[0] == 200:
            break
        time.sleep(0.25)
    else:
        raise RuntimeError(f"{name} not ready:\n{proc.tail()}")
    for path, body in (("/increments", BODY), ("/leads", LEAD)):
        code, raw = harness.http("POST", f"http://127.0.0.1:{port}{path}", body)
        if code != 200:
            raise RuntimeError(f"{name}: POST {path} -> {code} {raw[:200]!r}")
    code, raw = harness.http("POST", f"http://127.0.0.1:{port}/increments", b'{"key":"x","value":0}')
    if code != 400:
        raise RuntimeError(f"{name}: an invalid increment got {code}, not 400: the schema is not applied")
    return proc, port


def http_rounds(args: argparse.Namespace, before_src: Path, work: Path, results: Path) -> List[Dict[str, Any]]:
    after_src = ROOT
    redis = harness.Redis(work, results)
    rows: List[Dict[str, Any]] = []
    try:
        for rnd in range(args.rounds):
            for side, src in (("before", before_src), ("after", after_src)):
                proc, port = start_relayd(f"relayd-{side}", src, redis, work, results)
                try:
                    for path, script in (("/increments", "bench/increment.lua"), ("/leads", "bench/post.lua")):
                        url = f"http://127.0.0.1:{port}{path}"
                        harness.run_wrk(url, script, 3, 50, results / f"warm-{side}-{rnd}{path.replace('/', '-')}.txt", [proc])
                        r = harness.run_wrk(url, script, args.duration, 50,
                                            results / f"wrk-{side}-{rnd}{path.replace('/', '-')}.txt", [proc])
                        if r["non2xx"] or r["sock_errors"]:
                            raise RuntimeError(f"{side} {path}: {r['non2xx']} non-2xx, {r['sock_errors']} socket errors")
                        rows.append({"side": side, "route": path, "round": rnd, "rps": r["rps"],
                                     "p50_us": r["lat_p50_us"], "p99_us": r["lat_p99_us"]})
                        log(f"round {rnd} {side:6} {path:11} {r['rps']:8.0f} req/s  p50 {r['lat_p50_us']} us  "
                            f"p99 {r['lat_p99_us']} us")
                finally:
                    proc.stop()
    finally:
        redis.proc.stop()
    return rows


def median_rows(rows: List[Dict[str, Any]]) -> Dict[tuple, Dict[str, float]]:
    out: Dict[tuple, Dict[str, float]] = {}
    for key in {(r["side"], r["route"]) for r in rows}:
        mine = [r for r in rows if (r["side"], r["route"]) == key]
        out[key] = {k: statistics.median(r[k] for r in mine) for k in ("rps", "p50_us", "p99_us")}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="auto",
                        help="git revision with the fastjsonschema validator (default: the parent of the "
                             "commit that removed fastjsonschema from setup.py)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per measured wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved before/after rounds (median reported)")
    parser.add_argument("--no-http", action="store_true", help="per-message costs only")
    parser.add_argument("--micro-worker", metavar="SCHEMA", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.micro_worker:
        micro_worker(args.micro_worker)
        return 0
    ensure_fastjsonschema()
    if args.before == "auto":
        removed = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%H", "-S", "fastjsonschema",
                                  "--", "setup.py"], capture_output=True, text=True, check=True).stdout.strip()
        args.before = f"{removed}^"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = ROOT / "bench" / "results" / f"schema-{stamp}"
    results.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="schema-bench-"))
    try:
        before_src = extract(args.before, work / "before")
        log(f"per-message costs, before ({args.before}) and after, best of {args.rounds} interleaved rounds")
        costs = micro(before_src, args.rounds)
        b, a = costs["before"], costs["after"]
        print("\n| per increment message | before (fastjsonschema) us | after (jsonschema-rs) us | after/before |")
        print("|---|---|---|---|")
        print(f"| validate, increment.json (draft 7) | {b['validate_us']:.3f} | {a['validate_us']:.3f} | "
              f"{a['validate_us'] / b['validate_us']:.2f} |")
        print(f"| validate, same schema as 2020-12 | - | {a['validate_2020_us']:.3f} | "
              f"{a['validate_2020_us'] / b['validate_us']:.2f} |")
        print(f"| BodyParser.parse (draft 7) | {b['parse_us']:.3f} | {a['parse_us']:.3f} | "
              f"{a['parse_us'] / b['parse_us']:.2f} |")
        print(f"| BodyParser.parse (2020-12) | - | {a['parse_2020_us']:.3f} | {a['parse_2020_us'] / b['parse_us']:.2f} |")
        rows = [] if args.no_http else http_rounds(args, before_src, work, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (results / "rows.json").write_text(json.dumps({"micro": costs, "http": rows}, indent=1))
    if args.no_http:
        return 0
    med = median_rows(rows)
    print(f"\nstored POSTs, wrk -t1 -c50 -d{args.duration}s, median of {args.rounds} interleaved rounds "
          f"(before = {args.before})\n")
    print("| relayd | route | req/s | p50 us | p99 us | req/s vs. before | schema route vs. /leads |")
    print("|---|---|---|---|---|---|---|")
    for side in ("before", "after"):
        for route in ("/increments", "/leads"):
            m = med[(side, route)]
            vs_before = m["rps"] / med[("before", route)]["rps"]
            vs_leads = m["rps"] / med[(side, "/leads")]["rps"]
            print(f"| {side} | {route} | {m['rps']:.0f} | {m['p50_us']:.0f} | {m['p99_us']:.0f} | "
                  f"{vs_before:.3f} | {vs_leads:.3f} |")
    print(f"\nraw outputs: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
