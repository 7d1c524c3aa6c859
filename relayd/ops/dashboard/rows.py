"""The dashboard's rows: what an operator graphs, as PromQL, one function per row.

Each function returns a `Row`; `ROWS` orders them.  The metric names are
checked against a running relayd (tests/test_opskit_truth.py), and every
selector must filter on ``instance=~"$instance"`` (the worker row also on
``worker=~"$worker"``).  Recording rules (``relayd:...``) come from
etc/prometheus/relayd.rules.yml, which the Prometheus behind the dashboard
must load.

Adding a feature's row: write ``def delivery_row() -> Row`` here with its
panels, append it to `ROWS`, regenerate etc/grafana/relayd.json
(``python -m relayd.ops.dashboard.build etc/grafana/relayd.json``).
"""

from __future__ import annotations

from typing import Callable, Tuple

from relayd.ops.dashboard.panels import Query, Row, heatmap, stat, timeseries

#: The selector every query carries.
SEL = 'instance=~"$instance"'
#: Grafana's rate window: at least four scrape intervals, whatever the zoom.
WINDOW = "$__rate_interval"


def _rate(metric: str, by: str, extra: str = "") -> str:
    sel = f"{SEL},{extra}" if extra else SEL
    return f"sum by ({by}) (rate({metric}{{{sel}}}[{WINDOW}]))"


def _quantile(q: float, metric: str, by: str = "") -> str:
    group = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{WINDOW}])))"


def ingest_row() -> Row:
    """Ingest: messages in, responses by status class, refusals by reason."""
    return Row(
        "Ingest",
        (
            timeseries(
                "Messages ingested /s by route",
                Query(_rate("relayd_ingested_total", "route"), "{{route}}"),
                description="Messages accepted from clients (an NDJSON batch counts each line).",
                unit="cps",
            ),
            timeseries(
                "Responses /s by status class",
                Query(f"sum by (code_class) (relayd:responses:rate5m{{{SEL}}})", "{{code_class}}"),
                description="2xx = acknowledged; 429 = rate limited; 5xx = overloaded, not ready, store timeout or "
                "failure, too many connections, internal. Recording rule relayd:responses:rate5m (5 m window).",
                unit="reqps",
                stack=True,
            ),
            timeseries(
                "Rejected /s by reason",
                Query(_rate("relayd_rejected_total", "reason"), "{{reason}}"),
                description="relayd_rejected_total by reason (one per refused request, not per message).",
                unit="reqps",
            ),
            timeseries(
                "Refused for capacity (429 + 5xx)",
                Query(f"relayd:refused:ratio5m{{{SEL}}}", "{{instance}}"),
                description="Share of requests refused; the alert RelaydRefusingRequests fires above 5%.",
                unit="percentunit",
                width=12,
            ),
            timeseries(
                "Pushed to Redis /s by list",
                Query(_rate("relayd_forwarded_total", "list"), "{{list}}"),
                description="Messages LPUSHed, directly or replayed from the spool.",
                unit="cps",
                width=12,
            ),
        ),
    )


def latency_row() -> Row:
    """Latency: request and Redis round trip, as heatmaps and quantiles."""
    return Row(
        "Latency",
        (
            heatmap(
                "Request duration (2xx)",
                _rate("relayd_request_duration_seconds_bucket", "le"),
                description="Body received to response sent, acknowledged requests of every route.",
            ),
            timeseries(
                "Request duration p50 / p99 by route",
                Query(_quantile(0.5, "relayd_request_duration_seconds", "route"), "p50 {{route}}"),
                Query(_quantile(0.99, "relayd_request_duration_seconds", "route"), "p99 {{route}}"),
                Query(f"relayd:stored_ack_seconds:p99_5m{{{SEL}}}", "p99 stored acks (alert > 250 ms)"),
                unit="s",
                width=12,
            ),
            heatmap(
                "Redis round trip (LPUSH)",
                _rate("relayd_redis_roundtrip_seconds_bucket", "le"),
                description="One LPUSH batch, sent to reply.",
            ),
            timeseries(
                "Redis round trip p50 / p99",
                Query(_quantile(0.5, "relayd_redis_roundtrip_seconds"), "p50"),
                Query(_quantile(0.99, "relayd_redis_roundtrip_seconds"), "p99"),
                unit="s",
                width=12,
            ),
        ),
    )


def storage_row() -> Row:
    """Buffer and spool: depth, bytes, oldest age, fsync time, spill mode."""
    return Row(
        "Buffer and spool",
        (
            timeseries(
                "Buffer (memory) messages",
                Query(f"sum(relayd_buffer_messages{{{SEL}}})", "messages"),
                description="Messages in memory until Redis or the spool confirms them ([buffer] max_messages).",
            ),
            timeseries(
                "Buffer (memory) bytes",
                Query(f"sum(relayd_buffer_bytes{{{SEL}}})", "bytes"),
                unit="bytes",
            ),
            timeseries(
                "Spill mode and Redis",
                Query(f"max(relayd_spill_mode{{{SEL}}})", "spill mode"),
                Query(f"min(relayd_redis_up{{{SEL}}})", "Redis up"),
                description="Spill mode: new messages go through the disk spool (Redis down, slow, or a backlog).",
                max=1,
            ),
            timeseries(
                "Spool messages",
                Query(f"sum(relayd_spool_messages{{{SEL}}})", "pending"),
                description="Messages in the spool, not yet pushed to Redis.",
            ),
            timeseries(
                "Spool bytes",
                Query(f"sum(relayd_spool_bytes{{{SEL}}})", "pending payload"),
                Query(f"sum(relayd_spool_disk_bytes{{{SEL}}})", "segment files"),
                Query(f"sum(relayd_spool_max_bytes{{{SEL}}})", "max_bytes"),
                description="Segment files are what [spool] max_bytes bounds (alert RelaydSpoolFillingUp).",
                unit="bytes",
            ),
            timeseries(
                "Spool oldest message age",
                Query(f"max(relayd_spool_oldest_age_seconds{{{SEL}}})", "oldest"),
                description="How late the oldest spooled message will reach Redis, at least.",
                unit="s",
            ),
            timeseries(
                "Spool fsync p50 / p99",
                Query(_quantile(0.5, "relayd_spool_fsync_seconds"), "p50"),
                Query(_quantile(0.99, "relayd_spool_fsync_seconds"), "p99"),
                description="One group commit. Stored acks during spill mode wait for it.",
                unit="s",
            ),
            timeseries(
                "Spooled and replayed /s",
                Query(f"sum(rate(relayd_spilled_total{{{SEL}}}[{WINDOW}]))", "spilled"),
                Query(f"sum(rate(relayd_replayed_total{{{SEL}}}[{WINDOW}]))", "replayed"),
                unit="cps",
            ),
            timeseries(
                "Spool refusals and corrupt records",
                Query(_rate("relayd_spool_errors_total", "kind"), "refused: {{kind}}"),
                Query(f"sum(rate(relayd_spool_corrupt_records_total{{{SEL}}}[{WINDOW}]))", "corrupt records"),
                description="Any value here is an alert (RelaydSpoolRefusing, RelaydSpoolCorruptRecords).",
                unit="ops",
            ),
        ),
    )


def redis_row() -> Row:
    """Redis: failures by kind and batch sizes."""
    return Row(
        "Redis",
        (
            stat(
                "Redis up",
                Query(f"min(relayd_redis_up{{{SEL}}})", "up"),
                description="0 when any process has no usable Redis connection.",
            ),
            timeseries(
                "Redis failures /s by kind",
                Query(_rate("relayd_redis_errors_total", "kind"), "{{kind}}"),
                description="Failed pushes; their messages spill to disk and are retried from there.",
                unit="ops",
                width=10,
            ),
            timeseries(
                "Messages per LPUSH p50 / p99",
                Query(_quantile(0.5, "relayd_batch_size"), "p50"),
                Query(_quantile(0.99, "relayd_batch_size"), "p99"),
                description="Large batches mean Redis is the bottleneck and relayd is amortising round trips.",
                width=10,
            ),
        ),
    )


def workers_row() -> Row:
    """Workers and the reactor: readiness, restarts, per-worker throughput, loop lag."""
    iw = f'{SEL},worker=~"$worker"'
    return Row(
        "Workers and reactor",
        (
            stat("Ready", Query(f"min(relayd_ready{{{SEL}}})", "ready"), description="/readyz: 1 = 200."),
            stat(
                "Workers",
                Query(f"sum(relayd_workers{{{SEL}}})", "configured"),
                Query(f"sum(relayd_worker_up{{{iw}}})", "up"),
                description="Only with [server] workers > 1 (the supervisor's own series).",
            ),
            timeseries(
                "Messages /s per worker",
                Query(f"sum by (worker) (rate(relayd_worker_messages_total{{{iw}}}[{WINDOW}]))", "worker {{worker}}"),
                unit="cps",
            ),
            timeseries(
                "Worker restarts",
                Query(f"sum by (worker) (increase(relayd_worker_restarts_total{{{iw}}}[{WINDOW}]))", "worker {{worker}}"),
                description="Restarts after a crash or a stopped heartbeat (alert RelaydWorkerRestarting).",
                width=8,
            ),
            timeseries(
                "Reactor loop lag p50 / p99",
                Query(_quantile(0.5, "relayd_reactor_lag_seconds"), "p50"),
                Query(_quantile(0.99, "relayd_reactor_lag_seconds"), "p99"),
                Query(f"relayd:reactor_lag_seconds:p99_5m{{{SEL}}}", "p99 over 5 m (alert > 100 ms)"),
                description="How late the reactor runs timed calls: CPU-bound or blocking work on the event loop.",
                unit="s",
                width=16,
            ),
        ),
    )


def reply_row() -> Row:
    """Request/reply and idempotent ingest: replies by outcome, timeouts, round trip, duplicates."""
    return Row(
        "Request/reply and idempotency",
        (
            timeseries(
                "Replies /s by outcome",
                Query(f"sum by (outcome) (rate(relayd_replies_total{{{SEL}}}[{WINDOW}]))", "{{outcome}}"),
                Query(f"sum(rate(relayd_reply_timeouts_total{{{SEL}}}[{WINDOW}]))", "504 timeouts"),
                description="matched: relayed to the client; late: after its 504; malformed: not relayable.",
                unit="cps",
                width=8,
            ),
            timeseries(
                "Reply round trip p50 / p99",
                Query(_quantile(0.5, "relayd_reply_roundtrip_seconds"), "p50"),
                Query(_quantile(0.99, "relayd_reply_roundtrip_seconds"), "p99"),
                Query(f"sum(relayd_reply_waiting{{{SEL}}})", "waiting"),
                unit="s",
                width=8,
            ),
            timeseries(
                "Duplicates dropped /s (Idempotency-Key)",
                Query(f"sum by (where) (rate(relayd_duplicates_dropped_total{{{SEL}}}[{WINDOW}]))", "{{where}}"),
                Query(f"sum(relayd_idempotency_keys{{{SEL}}})", "keys in memory"),
                unit="cps",
                width=8,
            ),
        ),
    )


def deliver_row() -> Row:
    """Delivery to upstream HTTP endpoints: attempts by result, queue lag, dead letters, breakers."""
    return Row(
        "Delivery ([[deliver]])",
        (
            timeseries(
                "Upstream attempts /s by result",
                Query(f"sum by (deliver, result) (rate(relayd_deliver_attempts_total{{{SEL}}}[{WINDOW}]))",
                      "{{deliver}} {{result}}"),
                unit="cps",
                width=8,
            ),
            timeseries(
                "Queue lag and in flight",
                Query(f"max by (deliver) (relayd_deliver_queue_lag_seconds{{{SEL}}})", "{{deliver}} lag"),
                description="Age of the oldest queued message (alert RelaydDeliverQueueLag above 5 min).",
                unit="s",
                width=8,
            ),
            timeseries(
                "Dead letters and retries /s, circuit state",
                Query(f"sum by (deliver) (rate(relayd_deliver_dead_lettered_total{{{SEL}}}[{WINDOW}]))",
                      "{{deliver}} dead"),
                Query(f"sum by (deliver) (rate(relayd_deliver_retries_total{{{SEL}}}[{WINDOW}]))", "{{deliver}} retries"),
                Query(f"max by (deliver) (relayd_deliver_circuit_state{{{SEL}}})", "{{deliver}} circuit (2 = open)"),
                width=8,
            ),
        ),
    )


def counters_row() -> Row:
    """Counters: increments applied, staleness per sink, dead items."""
    return Row(
        "Counters ([[counter]])",
        (
            timeseries(
                "Increments applied /s",
                Query(f"sum by (counter) (rate(relayd_counter_applied_total{{{SEL}}}[{WINDOW}]))", "{{counter}}"),
                Query(f"sum by (counter) (rate(relayd_counter_dead_total{{{SEL}}}[{WINDOW}]))", "{{counter}} dead"),
                unit="cps",
                width=12,
            ),
            timeseries(
                "Staleness per sink",
                Query(f"max by (counter, sink) (relayd_counter_staleness_seconds{{{SEL}}})", "{{counter}} {{sink}}"),
                description="Age of the oldest acknowledged increment not yet applied (alert RelaydCountersStale > 12 s).",
                unit="s",
                width=12,
            ),
        ),
    )


def fanout_row() -> Row:
    """Live fan-out (SSE): subscribers, events out, slow subscribers cut, reader lag, ingest-to-write latency."""
    return Row(
        "Live fan-out (SSE)",
        (
            timeseries(
                "Subscribers and events /s",
                Query(f"sum(relayd_fanout_subscribers{{{SEL}}})", "subscribers"),
                Query(f"sum(rate(relayd_fanout_events_sent_total{{{SEL}}}[{WINDOW}]))", "events /s"),
                description="Live SSE subscribers, and events written to them (one per subscriber).",
                width=8,
            ),
            timeseries(
                "Slow subscribers cut /min, reader lag",
                Query(
                    f'sum(rate(relayd_fanout_subscribers_cut_total{{{SEL},reason="slow"}}[{WINDOW}])) * 60', "cut /min"
                ),
                Query(f"max(relayd_fanout_reader_lag_seconds{{{SEL}}})", "reader lag (s)"),
                description="Cut: write queue over its bound (they resume with Last-Event-ID). Lag: age of the newest entry read.",
                width=8,
            ),
            timeseries(
                "Ingest to subscriber p50 / p99",
                Query(_quantile(0.5, "relayd_fanout_latency_seconds"), "p50"),
                Query(_quantile(0.99, "relayd_fanout_latency_seconds"), "p99"),
                unit="s",
                width=8,
            ),
        ),
    )


#: The rows, top to bottom.  A landed feature appends its row function here.
ROWS: Tuple[Callable[[], Row], ...] = (
    ingest_row, latency_row, storage_row, redis_row, workers_row, reply_row, deliver_row, counters_row, fanout_row,
)
