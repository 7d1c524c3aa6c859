"""Prometheus metrics for one relayd process.

One `Metrics` object per process owns its own `CollectorRegistry` (no
module-level registry: tests build as many daemons as they like).  Hot-path
updates are pre-bound label children (`route_metrics`), so a request costs a
few attribute lookups, not a label-dict hash per message.
"""

from __future__ import annotations

from typing import Callable, Dict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Request latency buckets (seconds): stored acks live around 0.2-5 ms on a
# LAN Redis; the tail up to the ack timeout still needs resolution.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REDIS_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class RouteMetrics:
    """The pre-bound children of one route's series."""

    def __init__(self, metrics: Metrics, route: str) -> None:
        self.ingested = metrics.ingested.labels(route=route)
        self.latency = metrics.request_latency.labels(route=route)
        self._rejected = metrics.rejected
        self._route = route

    def rejected(self, reason: str) -> None:
        """Count one rejected request (not per message: a batch is one)."""
        self._rejected.labels(route=self._route, reason=reason).inc()


class Metrics:
    """All series of one process, in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ingested = Counter("relayd_ingested", "Messages accepted from clients.", ["route"], registry=r)
        self.rejected = Counter(
            "relayd_rejected", "Requests rejected, by reason.", ["route", "reason"], registry=r
        )
        self.forwarded = Counter(
            "relayd_forwarded", "Messages pushed to Redis (directly or replayed from the spool).", ["list"], registry=r
        )
        self.duplicates = Counter(
            "relayd_duplicates_dropped",
            "Requests with an Idempotency-Key already seen, by where they were caught "
            "(memory: this process's recent keys; direct/replay: the Redis script).",
            ["where"],
            registry=r,
        )
        self.idempotency_keys = Gauge(
            "relayd_idempotency_keys", "Idempotency keys remembered in this process (LRU).", registry=r
        )
        self.reply_waiting = Gauge("relayd_reply_waiting", "Request/reply requests waiting for their reply.", registry=r)
        self.replies = Counter(
            "relayd_replies",
            "Replies read from this process's reply list, by outcome (matched, late, malformed).",
            ["outcome"],
            registry=r,
        )
        self.reply_timeouts = Counter("relayd_reply_timeouts", "Request/reply requests answered 504.", registry=r)
        self.reply_roundtrip = Histogram(
            "relayd_reply_roundtrip_seconds",
            "Request/reply: request received to reply matched.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.redis_errors = Counter("relayd_redis_errors", "Failed Redis pushes, by kind.", ["kind"], registry=r)
        self.batch_size = Histogram(
            "relayd_batch_size", "Messages per LPUSH.", buckets=BATCH_BUCKETS, registry=r
        )
        self.redis_latency = Histogram(
            "relayd_redis_roundtrip_seconds", "LPUSH round-trip time.", buckets=REDIS_BUCKETS, registry=r
        )
        self.request_latency = Histogram(
            "relayd_request_duration_seconds",
            "Time from request body received to response.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.buffer_messages = Gauge("relayd_buffer_messages", "Messages in memory.", registry=r)
        self.buffer_bytes = Gauge("relayd_buffer_bytes", "Bytes in memory (with overhead).", registry=r)
        self.redis_up = Gauge("relayd_redis_up", "1 while Redis takes writes.", registry=r)
        self.spill_mode = Gauge("relayd_spill_mode", "1 while messages go through the disk spool.", registry=r)
        self.spilled = Counter("relayd_spilled", "Messages appended to the disk spool.", registry=r)
        self.replayed = Counter(
            "relayd_replayed", "Spooled messages pushed to Redis (also counted in relayd_forwarded).", registry=r
        )
        self.spool_messages = Gauge("relayd_spool_messages", "Messages waiting in the spool.", registry=r)
        self.spool_bytes = Gauge("relayd_spool_bytes", "Payload bytes waiting in the spool.", registry=r)
        self.spool_oldest_age = Gauge(
            "relayd_spool_oldest_age_seconds", "Age of the oldest spooled message.", registry=r
        )
        self.spool_corrupt = Counter(
            "relayd_spool_corrupt_records", "Corrupt spool records skipped and quarantined.", registry=r
        )
        self.spool_errors = Counter("relayd_spool_errors", "Spool appends refused, by kind.", ["kind"], registry=r)
        self.fsync_latency = Histogram(
            "relayd_spool_fsync_seconds", "Spool group-commit fsync time.", buckets=REDIS_BUCKETS, registry=r
        )
        # Fan-out (relayd/fanout/): live SSE subscribers of stream routes.
        self.fanout_subscribers = Gauge("relayd_fanout_subscribers", "Live SSE subscribers.", registry=r)
        self.fanout_events_sent = Counter(
            "relayd_fanout_events_sent", "Events written to subscribers (one per subscriber).", registry=r
        )
        self.fanout_cut = Counter(
            "relayd_fanout_subscribers_cut",
            "Subscribers disconnected, by reason (slow: their write queue passed its bound).",
            ["reason"],
            registry=r,
        )
        self.fanout_reader_lag = Gauge(
            "relayd_fanout_reader_lag_seconds",
            "Now minus the time of the newest stream entry the reader read (0 when caught up).",
            registry=r,
        )
        self.fanout_latency = Histogram(
            "relayd_fanout_latency_seconds",
            "Message ingest (envelope ts) to its event written to the subscribers.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._routes: Dict[str, RouteMetrics] = {}
        self._forwarded_children: Dict[bytes, Counter] = {}

    def route(self, path: str) -> RouteMetrics:
        """The pre-bound series of one route."""
        if path not in self._routes:
            self._routes[path] = RouteMetrics(self, path)
        return self._routes[path]

    def forwarded_to(self, list_key: bytes) -> Counter:
        """The forwarded counter child of one list (cached)."""
        child = self._forwarded_children.get(list_key)
        if child is None:
            child = self.forwarded.labels(list=list_key.decode("utf-8", "replace"))
            self._forwarded_children[list_key] = child
        return child

    def watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Make `gauge` read its value at scrape time (no hot-path updates)."""
        gauge.set_function(read)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
