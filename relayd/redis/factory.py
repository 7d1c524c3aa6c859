"""One Redis or a Redis Cluster, by `[redis] cluster`: the one place that picks.

Every part that opens its own Redis connections (the writer's client in
`relayd.tap.build_service`, the reply inbox's blocking reader) builds them
here, so a cluster config gives each of them a cluster-aware client and
none talks to the first seed as if it were the whole of Redis.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from relayd.config import RedisConfig
from relayd.redis.client import RedisClient
from relayd.redis.cluster import ClusterClient


def make_redis_client(
    reactor: Any, config: RedisConfig, observe_latency: Optional[Callable[[str], Callable[[float], None]]] = None
) -> Any:
    """A `RedisClient`, or a `ClusterClient` when `config.cluster` names seeds.

    Both have the same surface (`ready`, `on_ready`, `execute`, `lpush`, a
    Service); a cluster adds `ready_for(key)` and `unwritable_slots()`.
    `observe_latency(node)` (cluster only) gives a per-node latency sink.
    """
    if config.cluster:
        return ClusterClient(reactor, config, observe_latency)
    return RedisClient(reactor, config)
