"""Prometheus metrics for one relayd process.

One `Metrics` object per process owns its own `CollectorRegistry` (no
module-level registry: tests build as many daemons as they like).  Hot-path
updates are pre-bound label children (`route_metrics`), so a request costs a
few attribute lookups, not a label-dict hash per message.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from relayd.ops.fastmetrics import FastCollector, FastCounter, FastHistogram, items, single

# Request latency buckets (seconds): stored acks live around 0.2-5 ms on a
# LAN Redis; the tail up to the ack timeout still needs resolution.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REDIS_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
UPSTREAM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Cluster nodes with their own latency series; more (a huge cluster, or
# churn through failovers) share "other" so one process exports a bounded
# number of series whatever the topology does.
MAX_NODE_LABELS = 32
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
# Reactor loop lag (seconds): a healthy reactor is late by well under 1 ms;
# 0.1 s is what the alert calls slow, and the watchdog kills a worker whose
# heartbeat is 30 s late, so the buckets stop there.
REACTOR_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouteMetrics:
    """One route's series: the per-request ones as plain numbers (relayd/ops/fastmetrics.py)."""

    def __init__(self, metrics: Metrics, route: str) -> None:
        self.ingested = FastCounter()
        self.latency = FastHistogram(LATENCY_BUCKETS)
        self._rejected = metrics.rejected
        self._route = route

    def rejected(self, reason: str) -> None:
        """Count one rejected request (not per message: a batch is one)."""
        self._rejected.labels(route=self._route, reason=reason).inc()


class CounterMetrics:
    """The pre-bound series of one ``[[counter]]``."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.applied = metrics.counter_applied.labels(counter=name)
        self.duplicates = metrics.counter_duplicates.labels(counter=name)
        self.dead = metrics.counter_dead.labels(counter=name)
        self.batches = metrics.counter_batches.labels(counter=name, sink="hash")
        self.pg_batches = metrics.counter_batches.labels(counter=name, sink="postgres")
        self._staleness = metrics.counter_staleness
        self._name = name

    def watch_staleness(self, aggregator: Any, flusher: Any, clock: Any) -> None:
        """Scrape-time staleness per sink: the hash's, and PostgreSQL's (>= the hash's)."""
        self._staleness.labels(counter=self._name, sink="hash").set_function(aggregator.staleness)
        if flusher is not None:

            def pg() -> float:
                oldest = flusher.oldest_ts
                own = clock.seconds() - oldest if oldest is not None else 0.0
                return max(own, aggregator.staleness())

            self._staleness.labels(counter=self._name, sink="postgres").set_function(pg)


class DeliverMetrics:
    """The pre-bound children of one deliver's series (relayd/deliver/)."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._attempts = metrics.deliver_attempts
        self._children: Dict[str, Counter] = {}
        self._name = name
        self.retries = metrics.deliver_retries.labels(deliver=name)
        self.dead_lettered = metrics.deliver_dead_lettered.labels(deliver=name)
        self.latency = metrics.deliver_latency.labels(deliver=name)
        self.in_flight = metrics.deliver_in_flight.labels(deliver=name)
        self.queue_lag = metrics.deliver_queue_lag.labels(deliver=name)
        self.circuit_state = metrics.deliver_circuit_state.labels(deliver=name)

    def results(self) -> list:
        """The result labels counted so far (to remove them with the deliver)."""
        return list(self._children)

    def attempt(self, result: str) -> None:
        """Count one attempt by result: ``2xx``..``5xx`` or ``error`` (timeout, connection)."""
        child = self._children.get(result)
        if child is None:
            child = self._children[result] = self._attempts.labels(deliver=self._name, result=result)
        child.inc()


class Metrics:
    """All series of one process, in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Per-request and per-batch series: plain numbers exported at scrape time.
        self._routes: Dict[str, RouteMetrics] = {}
        fast = FastCollector()
        fast.counter(
            "relayd_ingested", "Messages accepted from clients.", "route",
            lambda: [(path, rm.ingested) for path, rm in self._routes.items()],
        )
        fast.histogram(
            "relayd_request_duration_seconds", "Time from request body received to response.", ("route",),
            lambda: [((path,), rm.latency) for path, rm in self._routes.items()],
        )
        self._forwarded_children: Dict[str, FastCounter] = {}
        fast.counter(
            "relayd_forwarded", "Messages pushed to Redis (directly or replayed from the spool).", "list",
            items(self._forwarded_children),
        )
        self.batch_size = FastHistogram(BATCH_BUCKETS)
        fast.histogram("relayd_batch_size", "Messages per LPUSH.", (), single(self.batch_size))
        r.register(fast)
        self.rejected = Counter(
            "relayd_rejected", "Requests rejected, by reason.", ["route", "reason"], registry=r
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
        self.gc_pause = Histogram(
            "relayd_gc_pause_seconds",
            "Cyclic garbage collections, by generation: how long each stalled the reactor.",
            ["generation"],
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
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
        self.redis_latency = Histogram(
            "relayd_redis_roundtrip_seconds", "LPUSH round-trip time.", buckets=REDIS_BUCKETS, registry=r
        )
        self.redis_node_latency = Histogram(
            "relayd_redis_node_roundtrip_seconds",
            f"Round-trip time of each command, by Redis Cluster node (at most {MAX_NODE_LABELS}, then 'other').",
            ["node"],
            buckets=REDIS_BUCKETS,
            registry=r,
        )
        self.buffer_messages = Gauge("relayd_buffer_messages", "Messages in memory.", registry=r)
        self.buffer_bytes = Gauge("relayd_buffer_bytes", "Bytes in memory (with overhead).", registry=r)
        self.redis_up = Gauge("relayd_redis_up", "1 while Redis takes writes.", registry=r)
        self.spill_mode = Gauge("relayd_spill_mode", "1 while messages go through the disk spool.", registry=r)
        self.spill_targets = Gauge(
            "relayd_spill_targets",
            "Destinations whose new messages go through the disk spool while the rest go direct "
            "(their Redis Cluster node failed, or their older messages are still spooled).",
            registry=r,
        )
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
        self.deliver_attempts = Counter(
            "relayd_deliver_attempts", "Upstream attempts by result (status class or error).", ["deliver", "result"],
            registry=r,
        )
        self.deliver_retries = Counter("relayd_deliver_retries", "Messages scheduled for a retry.", ["deliver"], registry=r)
        self.deliver_dead_lettered = Counter(
            "relayd_deliver_dead_lettered", "Messages moved to the dead-letter list.", ["deliver"], registry=r
        )
        self.deliver_latency = Histogram(
            "relayd_deliver_upstream_seconds", "Upstream exchange time (body included).", ["deliver"],
            buckets=UPSTREAM_BUCKETS, registry=r,
        )
        self.deliver_in_flight = Gauge(
            "relayd_deliver_in_flight", "Messages claimed by this process, not yet finished.", ["deliver"], registry=r
        )
        self.deliver_queue_lag = Gauge(
            "relayd_deliver_queue_lag_seconds", "Age of the oldest queued message (0 when empty).", ["deliver"],
            registry=r,
        )
        self.deliver_circuit_state = Gauge(
            "relayd_deliver_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", ["deliver"], registry=r
        )
        self._delivers: Dict[str, DeliverMetrics] = {}
        # -- for the operations kit (etc/prometheus, etc/grafana, docs/runbook.md) --
        self.spool_disk_bytes = Gauge(
            "relayd_spool_disk_bytes", "Size of the spool's segment files (what [spool] max_bytes bounds).", registry=r
        )
        self.spool_max_bytes = Gauge(
            "relayd_spool_max_bytes", "The spool's [spool] max_bytes (per worker; summed over workers).", registry=r
        )
        self.ready = Gauge("relayd_ready", "1 while /readyz would answer 200 (every readiness check passes).", registry=r)
        self.route_info = Gauge(
            "relayd_route_info", "One series per configured route: its list and ack mode.", ["route", "list", "ack"],
            registry=r,
        )
        self.reactor_lag = Histogram(
            "relayd_reactor_lag_seconds",
            "How late the reactor ran a timed call (relayd/ops/looplag.py): CPU-bound or blocking code.",
            buckets=REACTOR_LAG_BUCKETS,
            registry=r,
        )
        self._node_children: Dict[str, Histogram] = {}
        self.counter_applied = Counter(
            "relayd_counter_applied", "Increments counted into the hash (exactly once).", ["counter"], registry=r
        )
        self.counter_duplicates = Counter(
            "relayd_counter_duplicates",
            "Increments not counted because their message id was counted already (outbox re-push).",
            ["counter"],
            registry=r,
        )
        self.counter_dead = Counter(
            "relayd_counter_dead", "Items moved to <list>:dead (missing key, not an integer, ...).", ["counter"], registry=r
        )
        self.counter_batches = Counter(
            "relayd_counter_batches", "Batches applied, per sink.", ["counter", "sink"], registry=r
        )
        self.counter_staleness = Gauge(
            "relayd_counter_staleness_seconds",
            "Age of the oldest acknowledged increment not yet applied, per sink.",
            ["counter", "sink"],
            registry=r,
        )
        self._counters: Dict[str, CounterMetrics] = {}
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

    def route(self, path: str) -> RouteMetrics:
        """The pre-bound series of one route."""
        if path not in self._routes:
            self._routes[path] = RouteMetrics(self, path)
        return self._routes[path]

    def counter(self, name: str) -> CounterMetrics:
        """The pre-bound series of one counter."""
        if name not in self._counters:
            self._counters[name] = CounterMetrics(self, name)
        return self._counters[name]

    def deliver(self, name: str) -> DeliverMetrics:
        """The pre-bound series of one deliver."""
        if name not in self._delivers:
            self._delivers[name] = DeliverMetrics(self, name)
        return self._delivers[name]

    def forget_deliver(self, name: str) -> None:
        """Drop a removed deliver's series (SIGHUP), so its gauges stop reading a stopped service."""
        gone = self._delivers.pop(name, None)
        if gone is None:
            return
        for series in (
            self.deliver_retries, self.deliver_dead_lettered, self.deliver_latency, self.deliver_in_flight,
            self.deliver_queue_lag, self.deliver_circuit_state,
        ):
            try:
                series.remove(name)
            except KeyError:
                pass
        for result in gone.results():
            self.deliver_attempts.remove(name, result)

    def forwarded_to(self, list_key: bytes) -> FastCounter:
        """The forwarded counter of one list (created on first use)."""
        name = list_key.decode("utf-8", "replace")
        child = self._forwarded_children.get(name)
        if child is None:
            child = self._forwarded_children[name] = FastCounter()
        return child

    def redis_node(self, node: str) -> Callable[[float], None]:
        """The ``observe`` of one cluster node's latency series (bounded: see MAX_NODE_LABELS)."""
        child = self._node_children.get(node)
        if child is None:
            label = node if len(self._node_children) < MAX_NODE_LABELS else "other"
            child = self._node_children[node] = self.redis_node_latency.labels(node=label)
        return child.observe

    def describe_routes(self, routes: Iterable[Tuple[str, str, str]]) -> None:
        """Set `relayd_route_info` to exactly these ``(path, list, ack)`` routes (start and SIGHUP).

        Alert rules join on it to single out stored-ack routes: the request
        latency histogram itself has no ack label.
        """
        self.route_info.clear()
        for path, list_key, ack in routes:
            self.route_info.labels(route=path, list=list_key, ack=ack).set(1)

    def watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Make `gauge` read its value at scrape time (no hot-path updates)."""
        gauge.set_function(read)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
