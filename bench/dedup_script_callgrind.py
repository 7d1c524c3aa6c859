"""Redis instructions per keyed request for the dedup script alone, at the batch size of a saturated relayd.

    .venv/bin/python bench/dedup_script_callgrind.py [--batches 300] [--batch 40] [--baseline-code DIR]

bench/idempotency_callgrind.py measures relayd and Redis together, but under valgrind relayd
serves ~100 requests/s, so its EVALSHA batches hold 1-3 bundles and the script's fixed cost per
call dominates Redis's figure.  At saturation (wrk -c50) a batch holds ~20-40 bundles.  This
script drives redis-server (under callgrind) directly with batches of `--batch` one-message
bundles (~200 B messages, 30-character ids, `DedupListTarget.commands` builds them, so the
arguments are what relayd sends), after `--batches` batches of warm-up that grow the marker
keyspace as a run does, and reports instructions per request: this tree's script, the
``--baseline-code`` tree's (another checkout, e.g. ``git archive <commit> | tar -x -C DIR``),
and a plain ``LPUSH`` of the same messages (what a request without a key costs Redis).

Deterministic up to Redis's own timers (serverCron): repeated runs agree within ~0.5 %.
Needs valgrind; bench-only.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import tempfile
from typing import Any, Callable, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import redis  # noqa: E402

from bench.callgrind_tools import Callgrind  # noqa: E402
from tests.harness import free_port, wait_for  # noqa: E402

MESSAGE = b'{"message":"this is a lead message ' + b"x" * 150 + b'","shop":"a23m07b23"}'


def load_dedup(code: str) -> Any:
    """relayd.outbox.dedup of the checkout at `code` (its own `Script`, its own bundle layout)."""
    sys.path.insert(0, code)
    try:
        for name in [m for m in sys.modules if m == "relayd" or m.startswith("relayd.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("relayd.outbox.dedup")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(code)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each alternates which script goes first")
    ap.add_argument("--baseline-code", help="another checkout whose script to measure in the same run")
    args = ap.parse_args()
    cases: List[Tuple[str, Any]] = [("this", load_dedup(ROOT))]
    if args.baseline_code:
        cases.append(("baseline", load_dedup(os.path.abspath(args.baseline_code))))
    workdir = tempfile.mkdtemp(prefix="dedup-script-callgrind-")
    port = free_port()
    server = Callgrind("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", workdir], workdir, dict(os.environ))  # fmt: skip
    seq = [0]
    try:
        client = redis.Redis(port=port)
        wait_for(lambda: client.ping(), 120, "redis under valgrind")

        def batch_of(dedup: Any) -> Callable[[Any], None]:
            target = dedup.DedupListTarget(b"leads", 86_400_000)

            def add(pipe: Any) -> None:
                bundles = []
                for _ in range(args.batch):
                    seq[0] += 1
                    digest = hashlib.blake2b(b"%d" % seq[0], digest_size=16).hexdigest().encode()
                    bundles.append(dedup.encode_bundle(digest, b"%030x" % seq[0], [MESSAGE]))
                command = target.commands(bundles)[0]
                client.script_load(target.script.source)
                pipe.execute_command(*command)

            return add

        def plain(pipe: Any) -> None:
            pipe.execute_command(b"LPUSH", b"leads", *([MESSAGE] * args.batch))

        def measure(label: str, add: Callable[[Any], None]) -> float:
            pipes = []
            for _ in range(args.batches):
                pipe = client.pipeline(transaction=False)
                add(pipe)
                pipes.append(pipe)
            server.zero()
            for pipe in pipes:
                pipe.execute()
            client.delete(b"leads")
            return server.instructions(label) / (args.batches * args.batch)

        for _, dedup in cases:  # warm-up: script cache, a marker keyspace of a run's size
            measure("warm-up", batch_of(dedup))
        # The marker keyspace grows through the run and Redis rehashes its dicts incrementally at
        # powers of two: alternating the order gives both scripts the same share of that.
        rows: Dict[str, List[float]] = {}
        for r in range(args.rounds):
            for name, dedup in cases if r % 2 == 0 else list(reversed(cases)):
                rows.setdefault(name, []).append(measure(f"{name}-{r}", batch_of(dedup)))
        reference = measure("plain", plain)
        for name, runs in rows.items():
            per_request = sum(runs) / len(runs)
            print(f"{name:8s}: {per_request:,.0f} Redis instructions per keyed request "
                  f"(+{per_request - reference:,.0f} over a plain LPUSH's {reference:,.0f}); batch of {args.batch}; "
                  f"rounds: {', '.join(f'{x:,.0f}' for x in runs)}")  # fmt: skip
    finally:
        server.stop()
        print(f"profiles: {workdir}")


if __name__ == "__main__":
    main()
