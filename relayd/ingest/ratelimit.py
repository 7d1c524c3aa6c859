"""Rate limits: token buckets per route and per client.

A route may set ``rate_limit = "1000/s"`` (with ``rate_burst``, default one
second's worth) for everyone together, and ``client_rate_limit`` (with
``client_rate_burst``) per client: the bearer token when the route has one,
else the peer address.  A request takes one token per message (an NDJSON
batch of 500 lines takes 500), from the client's bucket and then the
route's; refused requests take nothing.

Refusals are 429 with ``Retry-After`` (seconds until enough tokens are
back) and the IETF draft headers ``RateLimit-Policy: "route";q=1000;w=1``
and ``RateLimit: "route";r=0;t=2``.

With several workers each process enforces ``rate / workers``: SO_REUSEPORT
spreads connections evenly, so the shares add up to the configured rate on
average, with no shared state on the hot path.  A single connection sees
only its worker's share; a global Redis-backed bucket is not built (say so
in the route's docs if exactness across workers matters).

Per-client buckets live in an LRU bounded to `MAX_CLIENTS` entries, so a
flood of distinct addresses cannot grow memory; an evicted client starts
again with a full bucket (a bias towards letting traffic through).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Optional, Tuple

from relayd.ingest.problems import TooManyRequests

MAX_CLIENTS = 100_000  # per-client buckets kept per route (~100 B each)


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def refill(self, now: float) -> None:
        """Add what accrued since the last look."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_for(self, count: int) -> float:
        """Seconds until `count` tokens are there (0 when they are; inf when never)."""
        if count <= self.tokens:
            return 0.0
        if count > self.burst:
            return math.inf
        return (count - self.tokens) / self.rate


def _policy(name: str, tokens: float, per: float) -> bytes:
    return b'"%s";q=%d;w=%d' % (name.encode(), int(tokens), int(per))


class RateLimiter:
    """The buckets of one route (route-wide and per client)."""

    def __init__(
        self,
        clock: Callable[[], float],
        rate: Optional[Tuple[float, float]],
        burst: Optional[int],
        client_rate: Optional[Tuple[float, float]],
        client_burst: Optional[int],
        share: float = 1.0,
    ) -> None:
        """`rate`/`client_rate` are (tokens, per seconds); `share` is 1/workers."""
        self._clock = clock
        now = clock()
        self._route: Optional[TokenBucket] = None
        self._route_policy = b""
        if rate is not None:
            per_second = rate[0] / rate[1] * share
            self._route = TokenBucket(per_second, max(1.0, (burst or rate[0]) * share), now)
            self._route_policy = _policy("route", rate[0], rate[1])
        self._client_rate = None
        self._client_policy = b""
        if client_rate is not None:
            self._client_rate = (client_rate[0] / client_rate[1] * share, max(1.0, (client_burst or client_rate[0]) * share))
            self._client_policy = _policy("client", client_rate[0], client_rate[1])
        self._clients: OrderedDict[bytes, TokenBucket] = OrderedDict()

    @property
    def active(self) -> bool:
        """Whether this route limits anything."""
        return self._route is not None or self._client_rate is not None

    def _client_bucket(self, client: bytes, now: float) -> TokenBucket:
        bucket = self._clients.get(client)
        if bucket is None:
            assert self._client_rate is not None
            bucket = TokenBucket(self._client_rate[0], self._client_rate[1], now)
            self._clients[client] = bucket
            if len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
        return bucket

    def take(self, client: bytes, count: int) -> None:
        """Take `count` tokens for `client`, or raise 429 and take none."""
        now = self._clock()
        buckets = []
        if self._client_rate is not None:
            buckets.append((self._client_bucket(client, now), "client", self._client_policy))
        if self._route is not None:
            buckets.append((self._route, "route", self._route_policy))
        for bucket, name, policy in buckets:
            bucket.refill(now)
            wait = bucket.wait_for(count)
            if wait:
                if math.isinf(wait):
                    detail = f"a request of {count} messages exceeds the {name} burst of {int(bucket.burst)}"
                    retry = 60
                else:
                    detail = f"{name} rate limit exceeded"
                    retry = max(1, math.ceil(wait))
                raise TooManyRequests(
                    detail,
                    retry_after=retry,
                    headers=(
                        (b"RateLimit-Policy", policy),
                        (b"RateLimit", b'"%s";r=%d;t=%d' % (name.encode(), int(bucket.tokens), retry)),
                    ),
                )
        for bucket, _, _ in buckets:
            bucket.tokens -= count

    def refund(self, client: bytes, count: int) -> None:
        """Give back what `take` took for a request refused later (503)."""
        buckets = [self._route] if self._route is not None else []
        if self._client_rate is not None and client in self._clients:
            buckets.append(self._clients[client])
        for bucket in buckets:
            bucket.tokens = min(bucket.burst, bucket.tokens + count)
