#!/usr/bin/env python3
"""Load generator for bench/fanout_bench.py: SSE subscribers + paced POSTs, one asyncio process.

    python bench/fanout_load.py PORT TEAMS SUBS_PER_TEAM RATE DURATION POSTERS

Opens TEAMS x SUBS_PER_TEAM subscriptions of /tracking/team<N>, then POSTs
RATE messages/s spread round-robin over the teams for DURATION seconds on
POSTERS keep-alive connections.  Each message carries a key; the POST's ack
time and each subscriber's receive time give the POST-ack-to-subscriber
latency.  Prints one JSON line: latencies (p50/p99/max), events expected
and received, POSTs acked, and this process's CPU seconds (to show the
generator is not the limit).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from typing import Dict, List

KEY_RE = re.compile(rb'"k":"([^"]+)"')


async def subscriber(port: int, team: int, ready: asyncio.Event, counter: List[int], received: Dict[bytes, List[float]]) -> None:
    while True:  # a 503 (Redis busy on a loaded box) is retried, as EventSource does
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.write(b"GET /tracking/team%d HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n" % team)
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 200"):
            break
        writer.close()
        counter[2] += 1
        await asyncio.sleep(0.5)
    counter[0] += 1
    if counter[0] == counter[1]:
        ready.set()
    buf = b""
    clock = time.monotonic
    while True:
        data = await reader.read(65536)
        if not data:
            return
        now = clock()
        buf += data
        # Only complete events (up to the last blank line) count, once each;
        # chunk framing lines between them are skipped by the pattern.
        cut = buf.rfind(b"\n\n")
        if cut >= 0:
            for m in KEY_RE.finditer(buf, 0, cut):
                received.setdefault(m.group(1), []).append(now)
            buf = buf[cut + 2 :]


async def poster(port: int, queue: asyncio.Queue, acked: Dict[bytes, float], sent: Dict[bytes, float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    clock = time.monotonic
    while True:
        item = await queue.get()
        if item is None:
            writer.close()
            return
        team, key = item
        body = b'{"k":"%s","worker":"w1","lat":41.15,"lon":-8.61}' % key
        sent[key] = clock()
        writer.write(
            b"POST /tracking/team%d HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (team, len(body), body)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        if head.startswith(b"HTTP/1.1 200"):
            acked[key] = clock()


def percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def main() -> None:
    port, teams, subs, rate, duration, posters = (int(a) if i != 4 else float(a) for i, a in enumerate(sys.argv[1:7]))
    ready = asyncio.Event()
    counter = [0, teams * subs, 0]  # subscribed, to subscribe, refused and retried
    if not counter[1]:
        ready.set()
    received: Dict[bytes, List[float]] = {}
    tasks = []
    for t in range(teams):
        for _ in range(subs):
            tasks.append(asyncio.ensure_future(subscriber(port, t, ready, counter, received)))
            if len(tasks) % 200 == 0:
                await asyncio.sleep(0.05)  # do not overflow the listen backlog
    await asyncio.wait_for(ready.wait(), 120)
    await asyncio.sleep(1.0)
    queue: asyncio.Queue = asyncio.Queue()
    acked: Dict[bytes, float] = {}
    sent: Dict[bytes, float] = {}
    workers = [asyncio.ensure_future(poster(port, queue, acked, sent)) for _ in range(posters)]
    print("posting", flush=True)  # the driver samples relayd's CPU from here...
    cpu0 = time.process_time()
    start = time.monotonic()
    n = 0
    total = int(rate * duration)
    while n < total:
        due = start + n / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((n % teams, b"m%d" % n))
        n += 1
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    post_wall = time.monotonic() - start
    print("posted", flush=True)  # ...to here
    await asyncio.sleep(2.0)  # let the last events arrive
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - start - 2.0
    latencies: List[float] = []
    e2e: List[float] = []
    for key, times in received.items():
        ack = acked.get(key)
        if ack is None:
            continue
        for t in times:
            latencies.append(max(0.0, t - ack))
            e2e.append(t - sent[key])
    print(json.dumps({
        "posts_acked": len(acked),
        "posts_planned": total,
        "post_seconds": round(post_wall, 2),
        "events_expected": len(acked) * subs,
        "events_per_s": round(sum(len(v) for v in received.values()) / post_wall, 1),
        "events_received": sum(len(v) for v in received.values()),
        "ack_to_sub_p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "ack_to_sub_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "ack_to_sub_max_ms": round(max(latencies, default=float("nan")) * 1000, 2),
        "post_to_sub_p99_ms": round(percentile(e2e, 0.99) * 1000, 2),
        "generator_cpu_share": round(cpu / wall, 3),
        "subscribe_retries": counter[2],
    }))
    for t in tasks:
        t.cancel()


if __name__ == "__main__":
    asyncio.run(main())
