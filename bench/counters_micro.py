"""Counters, in process: the aggregator's Python per increment, and the increment schema's validation.

Usage: python bench/counters_micro.py [--items N] [--reps R]

No Redis, no network: a batch of N envelopes as ingest writes them (one
route, 1000 per request, UUID keys, value 1) goes through what the
aggregator does with TAKE's reply until APPLY's bytes are ready
(`parse_take_reply`, `aggregate_framed`, the APPLY arguments, the RESP
encoding); best of R runs, microseconds per increment, with relayd's
garbage-collector threshold.  Then `is_valid` of the shipped increment
schema (etc/schemas/increment.json, draft 7 + ``format: uuid``) per
message, as compiled by this tree.  For a before/after, copy this file
into the other tree and run it there too (it imports the tree it sits in).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any, Callable, Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ujson  # noqa: E402

from relayd.codec import encode_envelopes  # noqa: E402
from relayd.counters import aggregate, redis_sink  # noqa: E402
from relayd.ops.gctune import GEN0_THRESHOLD  # noqa: E402
from relayd.redis.client import _encode_bytes  # noqa: E402
from relayd.redis.scripts import Script  # noqa: E402
from relayd.schema import compile_schema_file  # noqa: E402

KEY, VALUE = ("key",), ("value",)


def best(fn: Callable[[], Any], reps: int) -> float:
    """Shortest of `reps` runs, seconds."""
    out = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def take_reply(items: int) -> list:  # type: ignore[type-arg]
    """TAKE's reply for `items` envelopes (ids, lengths, body), 1000 a request, keys spread over 100k."""
    envelopes = []
    for r in range(0, items, 1000):
        n = min(1000, items - r)
        ids = ["%030x" % (r + i) for i in range(n)]
        bodies = [{"key": "00000000-0000-4000-8000-%012d" % ((r + i) * 7 % 100_000), "value": 1} for i in range(n)]
        envelopes += encode_envelopes(ids, 1_796_060_018.417325 + r / 1000, "/increments", "application/json", bodies)
    framed = aggregate.frame(envelopes)
    return [framed.id.encode(), b",".join(b"%d" % n for n in framed.lengths), framed.body]


def main() -> None:
    """Print the figures as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    gc.set_threshold(GEN0_THRESHOLD, *gc.get_threshold()[1:])
    reply = take_reply(args.items)
    script = Script("return 1")

    def to_apply_bytes() -> None:
        framed = aggregate.parse_take_reply(reply)
        batch = aggregate.aggregate_framed(framed, KEY, VALUE)
        if hasattr(batch, "field_args"):  # what HashSink.apply sends on its first call
            _buckets, argv = redis_sink._argv(batch, 86_400, 900, batch.field_args(), ())
        else:  # the tree before: str-keyed sums, encoded again
            _buckets, argv, _fields = redis_sink.apply_args(batch, 86_400, 900)
        _encode_bytes(script.command([b"counts:hits", b"{counts:hits}:batch:x", b"{counts:hits}:seen:1"], argv))

    framed = aggregate.parse_take_reply(reply)
    report: Dict[str, Any] = {
        "items": args.items,
        "take_reply_to_apply_bytes_us": best(to_apply_bytes, args.reps) / args.items * 1e6,
        "parse_take_reply_us": best(lambda: aggregate.parse_take_reply(reply), args.reps) / args.items * 1e6,
        "aggregate_framed_us": best(lambda: aggregate.aggregate_framed(framed, KEY, VALUE), args.reps) / args.items * 1e6,
    }
    schema = compile_schema_file(os.path.join(ROOT, "etc", "schemas", "increment.json"), "schema")
    values = [ujson.loads('{"key":"00000000-0000-4000-8000-%012d","value":1}' % i) for i in range(10_000)]
    report["increment_schema_is_valid_us"] = best(lambda: all(map(schema.is_valid, values)), args.reps) / len(values) * 1e6
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}))


if __name__ == "__main__":
    main()
