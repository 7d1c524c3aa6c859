"""The validated configuration: frozen attrs values and their defaults (one place for every default)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import attrs


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


ACK_MODES = ("stored", "accepted")
FORMATS = ("envelope", "body")

# Defaults, with the reason for each value.
DEFAULT_MAX_BODY = 1024 * 1024  # nginx's client_max_body_size and NSQ's ~1 MiB message cap
DEFAULT_BUFFER_MESSAGES = 100_000  # ~0.4 s of peak ingest on one core
DEFAULT_BUFFER_BYTES = 64 * 1024 * 1024  # bounds worst-case RSS growth per worker
DEFAULT_BATCH_MESSAGES = 1000  # one LPUSH of 1000 values costs ~ the same RTT as one
DEFAULT_BATCH_BYTES = 1024 * 1024  # keep a single Redis command well under its 512 MiB limit
DEFAULT_MAX_IN_FLIGHT = 4  # enough to hide one RTT; more only reorders on failure
# seconds; txredisapi waits forever without one (issue 112).  Also the bound
# on how long a stored request waits for a Redis that stopped replying
# (frozen, swapping) before its batch fails and spills to disk: 1 s keeps
# stored acks prompt, and is ~100x a large LPUSH on a LAN.
DEFAULT_REPLY_TIMEOUT = 1.0
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds
DEFAULT_ACK_TIMEOUT = 10.0  # seconds a stored-ack request may wait before 503
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds to push the buffer out on SIGTERM (< systemd's 90 s)
DEFAULT_IDLE_TIMEOUT = 60.0  # keep-alive idle timeout, seconds (nginx: 75 s)
DEFAULT_MAX_LINES = 10_000  # NDJSON lines per batch: 10k x ~100 B fits the 1 MiB body cap
DEFAULT_MAX_DEPTH = 64  # JSON nesting; real payloads rarely pass 10, validators recurse
DEFAULT_WEBHOOK_TOLERANCE = 300.0  # seconds; Standard Webhooks' recommended replay window
DEFAULT_MAX_CONNECTIONS = 10_000  # per process; stays under a LimitNOFILE of 65536 with workers
DEFAULT_MAX_CONNECTIONS_PER_PEER = 256  # one NATed office still fits; one flooder does not
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds to send the request line + headers (nginx: 60 s)
DEFAULT_BODY_TIMEOUT = 30.0  # seconds for a whole body (1 MiB at ~35 KiB/s)
DEFAULT_MAX_HEADER_BYTES = 16 * 1024  # request line + headers; twisted.web's own default
DEFAULT_MAX_HEADERS = 64  # header fields per request (browsers send ~15)
# How long an Idempotency-Key is remembered: Stripe keeps keys 24 h, which
# covers client retry loops and a day of operator replays.
DEFAULT_IDEMPOTENCY_WINDOW = 24 * 3600.0
DEFAULT_HISTORY = 1000  # stream entries kept for resume (MAXLEN ~): minutes of one team's positions
DEFAULT_LISTEN = "tcp:8080"
# listen(2) backlog when the endpoint string sets none.  Twisted's default
# is 50: a burst of 5,000 connects had 1,784 closed unanswered with it, none
# with 1024 (also the kernel's somaxconn default since Linux 5.4: 4096).
DEFAULT_BACKLOG = 1024
_BACKLOG_KINDS = ("tcp", "tcp6", "ssl", "unix")
DEFAULT_ADMIN = "tcp:9090:interface=127.0.0.1"  # admin stays on localhost unless asked
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_SPOOL_DIR = "var/spool"
DEFAULT_SPOOL_BYTES = 1024**3
DEFAULT_FLUSH_INTERVAL = 5.0  # seconds; the seed's bound is 10 s, half of it leaves room for a slow flush
MAX_FLUSH_INTERVAL = 10.0  # the product promise: totals never staler than 10 s
DEFAULT_COUNTER_BATCH = 10_000  # messages per apply: ~1 MB EVAL, a few ms of Redis time
DEFAULT_DEDUPE_WINDOW = 900.0  # seconds a counted message id is remembered (outbox duplicates come within seconds)
DEFAULT_COUNTER_TABLE = "counters"


@attrs.frozen
class ServerConfig:
    """The `[server]` table: where relayd listens and how many processes."""

    listen: str = DEFAULT_LISTEN
    admin: str = DEFAULT_ADMIN
    workers: Union[int, str] = 1  # int >= 1, or "auto"
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    backlog: int = DEFAULT_BACKLOG


@attrs.frozen
class RedisConfig:
    """The `[redis]` table: the target server and the forwarder's batching."""

    url: str = attrs.field(default=DEFAULT_REDIS_URL, repr=False)  # may hold the password
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = attrs.field(default=None, repr=False)
    reply_timeout: float = DEFAULT_REPLY_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    batch_messages: int = DEFAULT_BATCH_MESSAGES
    batch_bytes: int = DEFAULT_BATCH_BYTES
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    # Redis Cluster seed nodes ((host, port), ...); empty = one Redis at `url`.
    # With seeds, host/port above are the first seed's and db is 0.
    cluster: Tuple[Tuple[str, int], ...] = ()


@attrs.frozen
class BufferConfig:
    """The `[buffer]` table: the in-memory bound (messages and bytes)."""

    max_messages: int = DEFAULT_BUFFER_MESSAGES
    max_bytes: int = DEFAULT_BUFFER_BYTES
    ack_timeout: float = DEFAULT_ACK_TIMEOUT


@attrs.frozen
class SpoolConfig:
    """The `[spool]` table: local disk spillover."""

    dir: str = DEFAULT_SPOOL_DIR
    max_bytes: int = DEFAULT_SPOOL_BYTES
    fsync: str = "batch"


@attrs.frozen
class RouteConfig:
    """One `[[route]]`: an ingest path and the Redis list it feeds."""

    path: str
    list: str
    ack: str = "stored"
    schema: Optional[str] = None
    format: str = "envelope"
    max_body: int = DEFAULT_MAX_BODY
    max_lines: int = DEFAULT_MAX_LINES
    max_depth: int = DEFAULT_MAX_DEPTH
    auth_tokens_file: Optional[str] = None
    webhook_secret_file: Optional[str] = None
    webhook_scheme: str = "standard"
    webhook_tolerance: float = DEFAULT_WEBHOOK_TOLERANCE
    rate_limit: Optional[Tuple[float, float]] = None  # (tokens, per seconds)
    rate_burst: Optional[int] = None
    client_rate_limit: Optional[Tuple[float, float]] = None
    client_rate_burst: Optional[int] = None
    idempotency_window: float = DEFAULT_IDEMPOTENCY_WINDOW
    reply_timeout: Optional[float] = None  # set: a request/reply route
    stream: Optional[str] = None  # set: XADD to this stream (fan-out); list "" then means none
    history: int = DEFAULT_HISTORY


@attrs.frozen
class LimitsConfig:
    """The `[limits]` table: what one client or connection may cost."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_headers: int = DEFAULT_MAX_HEADERS


# [[deliver]] defaults (docs/delivery.md explains each).
DEFAULT_DELIVER_CONCURRENCY = 16  # requests in flight per process: hides ~16 RTTs of upstream latency
DEFAULT_DELIVER_TIMEOUT = 10.0  # seconds for the whole exchange; most APIs answer in < 1 s
DEFAULT_DELIVER_MAX_ATTEMPTS = 10  # with 1 s doubling to 10 m: ~1.5 h of retries before a dead letter
DEFAULT_DELIVER_BACKOFF = 1.0  # seconds before the first retry
DEFAULT_DELIVER_BACKOFF_MAX = 600.0  # seconds; an outage longer than 10 m is retried every ~10 m
DEFAULT_DELIVER_VISIBILITY = 30.0  # seconds a dead process's claimed messages wait before another takes them
DEFAULT_DELIVER_BREAKER = 5  # consecutive failures that open the circuit breaker
DELIVER_METHODS = ("POST", "PUT", "PATCH")


@attrs.frozen
class DeliverConfig:
    """One `[[deliver]]`: a Redis list fed to an upstream HTTP endpoint."""

    name: str
    list: str
    url: str
    method: str = "POST"
    headers: Tuple[Tuple[str, str], ...] = ()
    rate: Optional[Tuple[float, float]] = None  # (requests, per seconds), global; None = unlimited
    concurrency: int = DEFAULT_DELIVER_CONCURRENCY
    timeout: float = DEFAULT_DELIVER_TIMEOUT
    max_attempts: int = DEFAULT_DELIVER_MAX_ATTEMPTS
    backoff: float = DEFAULT_DELIVER_BACKOFF
    backoff_max: float = DEFAULT_DELIVER_BACKOFF_MAX
    dead_letter: str = ""  # filled with "<list>:dead" by the parser
    sign_secret_file: Optional[str] = None
    visibility_timeout: float = DEFAULT_DELIVER_VISIBILITY
    breaker_failures: int = DEFAULT_DELIVER_BREAKER


@attrs.frozen
class CounterConfig:
    """One `[[counter]]`: a list of increments summed into a hash (and PostgreSQL)."""

    name: str
    list: str
    hash: str
    key: Tuple[str, ...] = ("key",)  # parsed JSON pointer
    value: Tuple[str, ...] = ("value",)
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    postgres: Optional[str] = attrs.field(default=None, repr=False)  # may hold a password
    table: str = DEFAULT_COUNTER_TABLE
    batch_messages: int = DEFAULT_COUNTER_BATCH
    dedupe_window: float = DEFAULT_DEDUPE_WINDOW


@attrs.frozen
class Config:
    """The whole daemon configuration."""

    server: ServerConfig
    redis: RedisConfig
    buffer: BufferConfig
    spool: SpoolConfig
    routes: Tuple[RouteConfig, ...]
    limits: LimitsConfig = LimitsConfig()
    delivers: Tuple[DeliverConfig, ...] = ()
    counters: Tuple[CounterConfig, ...] = ()


