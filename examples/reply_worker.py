"""A request/reply worker for relayd, in a few lines of redis-py.

relayd pushes each request to a Redis list as an envelope with a
``reply_to`` key; a worker pops it, does the work, and pushes the reply to
``reply_to``.  relayd answers the waiting HTTP request with it.

    python examples/reply_worker.py --redis redis://127.0.0.1:6379/0 --list quote-requests

Run it next to ``scripts/run`` with a route such as::

    [[route]]
    path = "/quote"
    list = "quote-requests"
    reply_timeout = "5s"

and ``curl -s -X POST localhost:8080/quote -H 'Content-Type: application/json' -d '{"sku": 42}'``.

``--mode`` exists for relayd's own tests: ``echo`` (default), ``slow``
(reply after ``--delay`` seconds), ``malformed`` (a reply relayd cannot
relay), ``vanish`` (take one request and exit without replying).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import redis


def reply_for(envelope: dict, mode: str) -> bytes:
    """The reply to one request envelope."""
    if mode == "malformed":
        return json.dumps({"id": envelope["id"], "status": "two hundred"}).encode()
    return json.dumps(
        {
            "id": envelope["id"],
            "status": 200,
            "headers": {"Content-Type": "application/json", "X-Worker": str(os.getpid())},
            "body": {"echo": envelope["body"], "worker": os.getpid()},
        }
    ).encode()


def main() -> None:
    """Serve requests until interrupted."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--list", default="quote-requests")
    p.add_argument("--max-age", type=float, default=30.0, help="skip requests older than this (their caller gave up)")
    p.add_argument("--mode", choices=("echo", "slow", "malformed", "vanish"), default="echo")
    p.add_argument("--delay", type=float, default=0.0)
    args = p.parse_args()
    r = redis.Redis.from_url(args.redis)
    while True:
        _, raw = r.brpop([args.list])
        envelope = json.loads(raw)
        if args.mode == "vanish":
            os._exit(0)
        if time.time() - envelope["ts"] > args.max_age:
            continue
        if args.mode == "slow":
            time.sleep(args.delay)
        r.lpush(envelope["reply_to"], reply_for(envelope, args.mode))


if __name__ == "__main__":
    main()
