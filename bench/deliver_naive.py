"""The naive consumer bench/deliver_bench.py compares relayd's delivery with.

What people write first: redis-py ``BRPOP`` plus a ``requests.Session``
POST loop, one process, one message at a time.  It does the same per-message
work as relayd (parse the envelope, send its body with ``Idempotency-Key``)
but none of the safety (a crash mid-POST loses the message).
Usage: ``python bench/deliver_naive.py REDIS_PORT LIST URL COUNT``.
"""

from __future__ import annotations

import json
import sys

import redis
import requests


def main() -> None:
    """Consume COUNT messages, then exit."""
    port, key, url, count = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    r = redis.Redis(port=port)
    session = requests.Session()
    for _ in range(count):
        _, item = r.brpop([key])
        envelope = json.loads(item)
        body = envelope["body"]
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        response = session.post(
            url, data=data, headers={"Content-Type": envelope["content_type"], "Idempotency-Key": envelope["id"]}
        )
        response.raise_for_status()


if __name__ == "__main__":
    main()
