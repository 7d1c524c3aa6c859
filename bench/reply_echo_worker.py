"""The benchmark's echo worker: examples/reply_worker.py's reply logic, drained in batches.

    python bench/reply_echo_worker.py REDIS_PORT LIST [--batch 256]

One redis-py process.  It answers every envelope on LIST with
`examples.reply_worker.reply_for(envelope, "echo")`, pushed to the
envelope's ``reply_to`` -- whoever asked: relayd (its per-process reply
list) or the naive reference (a fresh key per request).  The same worker
serves both, so the comparison is about the HTTP side only.

Per loop: BRPOP one envelope, RPOP up to ``--batch - 1`` more, then one
pipelined round of LPUSHes.  `--batch 1` is exactly the example's loop
(BRPOP, LPUSH, one at a time); the batched loop keeps the single Python
worker from being the limit when relayd is pushed to its maximum rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import redis

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from reply_worker import reply_for  # noqa: E402


def main() -> None:
    """Answer requests until killed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("list")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--max-age", type=float, default=30.0)
    args = p.parse_args()
    r = redis.Redis(port=args.port)
    print(f"reply_echo_worker pid={os.getpid()} list={args.list} batch={args.batch}", flush=True)
    while True:
        popped = r.brpop([args.list], timeout=1)
        if popped is None:
            continue
        raws = [popped[1]]
        if args.batch > 1:
            raws.extend(r.rpop(args.list, args.batch - 1) or ())
        pipe = r.pipeline(transaction=False)
        now = time.time()
        for raw in raws:
            envelope = json.loads(raw)
            if now - envelope["ts"] > args.max_age:
                continue
            pipe.lpush(envelope["reply_to"], reply_for(envelope, "echo"))
        pipe.execute()


if __name__ == "__main__":
    main()
