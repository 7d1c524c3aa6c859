"""Configuration: TOML text -> frozen, fully validated values.

Parsing is a pure function (`config_from_string`) so every rule can be
property-tested without touching a disk.  The checks that need the file
system (schema files readable and valid, spool directory writable) live in
`check_environment`, and `load_config` composes both (plus the command
line's overrides): a config that loads is
fully validated before any port is bound.

Every rejection is a `ConfigError` whose message is one line naming the key
(``route[2].max_body: expected a size like "1MiB", got "lots"``), because the
operator reads it in a journal line, not a traceback.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union
from urllib.parse import unquote, urlsplit

import attrs

from relayd.ingest.paths import TemplateError, path_names

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - pypy3 (3.9) keeps working
    import tomli as tomllib  # type: ignore[no-redef]

from relayd.spool.segments import FSYNC_POLICIES  # the spool owns its policy names (a leaf module: no cycle)


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


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}


def parse_size(value: Any, key: str) -> int:
    """Parse ``"1MiB"``, ``"10MB"``, ``"512B"`` or an integer byte count."""
    if isinstance(value, bool):
        raise ConfigError(f'{key}: expected a size like "1MiB", got {value!r}')
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: size must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").upper()]
    raise ConfigError(f'{key}: expected a size like "1MiB", got {value!r}')


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any, key: str) -> float:
    """``"500ms"``, ``"10s"``, ``"5m"``, ``"24h"``, ``"7d"`` or a number of seconds -> seconds (> 0)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(f'{key}: expected a duration like "10s", "5m" or "24h", got {value!r}')
    if seconds <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value!r}")
    return seconds


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a table")
    return value


def _check_keys(table: Mapping[str, Any], allowed: Tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key (allowed: {', '.join(allowed)})")


def _typed(table: Mapping[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    if key not in table:
        return default
    value = table[key]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _positive(value: Any, key: str) -> Any:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")
    return value


def _choice(value: str, choices: Tuple[str, ...], key: str) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _resolve(path: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


_REDIS_URL_RE = re.compile(
    r"^redis://(?:(?P<user>[^:@/]*)(?::(?P<password>[^@/]*))?@)?"
    r"(?P<host>\[[0-9a-fA-F:]+\]|[^:/@]+)(?::(?P<port>\d+))?(?:/(?P<db>\d+)?)?$"
)


def with_backlog(endpoint: str, backlog: int) -> str:
    """`endpoint` with ``:backlog=N`` added when it is a listening kind that sets none.

    ``tcp:8080`` -> ``tcp:8080:backlog=1024``; ``systemd:...`` (the socket
    unit's ListenBacklog decides) and strings that set one are unchanged.
    """
    kind = endpoint.split(":", 1)[0].strip().lower()
    if kind in _BACKLOG_KINDS and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={backlog}"
    return endpoint


def _parse_server(data: Mapping[str, Any]) -> ServerConfig:
    t = _table(data, "server")
    _check_keys(t, ("listen", "admin", "workers", "shutdown_timeout", "idle_timeout", "backlog"), "server")
    workers = t.get("workers", 1)
    if workers != "auto" and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ConfigError(f'server.workers: expected an integer >= 1 or "auto", got {workers!r}')
    backlog = _positive(_typed(t, "backlog", int, DEFAULT_BACKLOG, "server"), "server.backlog")
    return ServerConfig(
        listen=with_backlog(_typed(t, "listen", str, DEFAULT_LISTEN, "server"), backlog),
        backlog=backlog,
        admin=_typed(t, "admin", str, DEFAULT_ADMIN, "server"),
        workers=workers,
        shutdown_timeout=_positive(
            _typed(t, "shutdown_timeout", float, DEFAULT_SHUTDOWN_TIMEOUT, "server"), "server.shutdown_timeout"
        ),
        idle_timeout=_positive(
            _typed(t, "idle_timeout", float, DEFAULT_IDLE_TIMEOUT, "server"), "server.idle_timeout"
        ),
    )


def _parse_redis_url(url: str, key: str) -> Tuple[str, int, int, Optional[str], Optional[str]]:
    """``redis://[user:password@]host[:port][/db]`` -> (host, port, db, user, password)."""
    m = _REDIS_URL_RE.match(url)
    if not m:
        raise ConfigError(f"{key}: expected redis://[user:password@]host[:port][/db], got {url!r}")
    port = int(m.group("port") or 6379)
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: port out of range: {port}")
    return (
        m.group("host").strip("[]"),
        port,
        int(m.group("db") or 0),
        unquote(m.group("user")) if m.group("user") else None,
        unquote(m.group("password")) if m.group("password") is not None else None,
    )


def _parse_cluster_seeds(value: Any) -> Tuple[Tuple[Tuple[str, int], ...], Optional[str], Optional[str]]:
    """`redis.cluster`: seed URLs -> ((host, port), ...), user, password.

    A cluster has only db 0, and every node takes the same credentials, so
    seeds that name another db or disagree on credentials are errors.
    """
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError('redis.cluster: expected a non-empty list of "redis://host:port" seed URLs')
    seeds = []
    creds: Optional[Tuple[Optional[str], Optional[str]]] = None
    for i, url in enumerate(value):
        host, port, db, user, password = _parse_redis_url(url, f"redis.cluster[{i}]")
        if db != 0:
            raise ConfigError(f"redis.cluster[{i}]: a Redis Cluster has only db 0, got /{db}")
        if creds is not None and (user, password) != creds:
            raise ConfigError(f"redis.cluster[{i}]: every seed must carry the same user:password")
        creds = (user, password)
        if (host, port) not in seeds:
            seeds.append((host, port))
    assert creds is not None
    return tuple(seeds), creds[0], creds[1]


def _parse_redis(data: Mapping[str, Any]) -> RedisConfig:
    t = _table(data, "redis")
    _check_keys(
        t,
        ("url", "cluster", "reply_timeout", "connect_timeout", "batch_messages", "batch_bytes", "max_in_flight"),
        "redis",
    )
    cluster: Tuple[Tuple[str, int], ...] = ()
    if "cluster" in t:
        if "url" in t:
            raise ConfigError("redis.cluster: set either redis.url (one Redis) or redis.cluster (seed nodes), not both")
        cluster, user, password = _parse_cluster_seeds(t["cluster"])
        url = ",".join(t["cluster"])
        host, port, db = cluster[0][0], cluster[0][1], 0
    else:
        url = _typed(t, "url", str, DEFAULT_REDIS_URL, "redis")
        host, port, db, user, password = _parse_redis_url(url, "redis.url")
    return RedisConfig(
        url=url,
        host=host,
        port=port,
        db=db,
        username=user,
        password=password,
        cluster=cluster,
        reply_timeout=_positive(
            _typed(t, "reply_timeout", float, DEFAULT_REPLY_TIMEOUT, "redis"), "redis.reply_timeout"
        ),
        connect_timeout=_positive(
            _typed(t, "connect_timeout", float, DEFAULT_CONNECT_TIMEOUT, "redis"), "redis.connect_timeout"
        ),
        batch_messages=_positive(
            _typed(t, "batch_messages", int, DEFAULT_BATCH_MESSAGES, "redis"), "redis.batch_messages"
        ),
        batch_bytes=_positive(
            parse_size(t.get("batch_bytes", DEFAULT_BATCH_BYTES), "redis.batch_bytes"), "redis.batch_bytes"
        ),
        max_in_flight=_positive(
            _typed(t, "max_in_flight", int, DEFAULT_MAX_IN_FLIGHT, "redis"), "redis.max_in_flight"
        ),
    )


def _parse_buffer(data: Mapping[str, Any]) -> BufferConfig:
    t = _table(data, "buffer")
    _check_keys(t, ("max_messages", "max_bytes", "ack_timeout"), "buffer")
    return BufferConfig(
        max_messages=_positive(
            _typed(t, "max_messages", int, DEFAULT_BUFFER_MESSAGES, "buffer"), "buffer.max_messages"
        ),
        max_bytes=_positive(
            parse_size(t.get("max_bytes", DEFAULT_BUFFER_BYTES), "buffer.max_bytes"), "buffer.max_bytes"
        ),
        ack_timeout=_positive(
            _typed(t, "ack_timeout", float, DEFAULT_ACK_TIMEOUT, "buffer"), "buffer.ack_timeout"
        ),
    )


def _parse_spool(data: Mapping[str, Any], base_dir: str) -> SpoolConfig:
    t = _table(data, "spool")
    _check_keys(t, ("dir", "max_bytes", "fsync"), "spool")
    return SpoolConfig(
        dir=_resolve(_typed(t, "dir", str, DEFAULT_SPOOL_DIR, "spool"), base_dir),
        max_bytes=_positive(parse_size(t.get("max_bytes", DEFAULT_SPOOL_BYTES), "spool.max_bytes"), "spool.max_bytes"),
        fsync=_choice(_typed(t, "fsync", str, "batch", "spool"), FSYNC_POLICIES, "spool.fsync"),
    )


_ROUTE_KEYS = (
    "path", "list", "ack", "schema", "format", "max_body", "max_lines", "max_depth",
    "auth_tokens_file", "webhook_secret_file", "webhook_scheme", "webhook_tolerance",
    "rate_limit", "rate_burst", "client_rate_limit", "client_rate_burst", "idempotency_window",
    "reply_timeout", "stream", "history",
)
WEBHOOK_SCHEMES = ("standard", "github")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def parse_rate(value: Any, key: str) -> Tuple[float, float]:
    """``"1000/s"``, ``"60/min"``, ``"5/10s"`` -> (tokens, per seconds)."""
    if isinstance(value, str):
        m = _RATE_RE.match(value)
        if m and float(m.group(1)) > 0:
            per = int(m.group(2) or 1) * _RATE_UNITS[m.group(3)]
            if per > 0:
                return float(m.group(1)), float(per)
    raise ConfigError(f'{key}: expected a rate like "1000/s" or "60/min", got {value!r}')


def _parse_route(t: Any, index: int, base_dir: str) -> RouteConfig:
    where = f"route[{index}]"
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: expected a table")
    _check_keys(t, _ROUTE_KEYS, where)
    if "path" not in t:
        raise ConfigError(f"{where}.path: missing")
    if "list" not in t and "stream" not in t:
        raise ConfigError(f"{where}.list: missing (a route needs a list, a stream, or both)")
    path = _typed(t, "path", str, None, where)
    if not path.startswith("/") or any(c in path for c in "?# \t\r\n"):
        raise ConfigError(f"{where}.path: expected an absolute path like /leads, got {path!r}")
    try:
        path_names(path)
    except TemplateError as e:
        raise ConfigError(f"{where}.path: {e}") from None
    list_key = _typed(t, "list", str, "", where)
    if "list" in t and not list_key:
        raise ConfigError(f"{where}.list: must not be empty")
    stream = _typed(t, "stream", str, None, where)
    if stream is not None and not stream:
        raise ConfigError(f"{where}.stream: must not be empty")
    history = _positive(_typed(t, "history", int, DEFAULT_HISTORY, where), f"{where}.history")
    if "history" in t and stream is None:
        raise ConfigError(f"{where}.history: only for a route with a stream")
    schema = _typed(t, "schema", str, None, where)
    fmt = _choice(_typed(t, "format", str, "envelope", where), FORMATS, f"{where}.format")
    reply_timeout = parse_duration(t["reply_timeout"], f"{where}.reply_timeout") if "reply_timeout" in t else None
    if reply_timeout is not None:
        if fmt != "envelope":
            raise ConfigError(f'{where}.reply_timeout: a request/reply route needs format = "envelope" (for reply_to)')
        if t.get("ack", "stored") != "stored":
            raise ConfigError(f'{where}.reply_timeout: a request/reply route stores its requests (ack = "stored")')
        if stream is not None:
            raise ConfigError(f"{where}.reply_timeout: a request/reply route cannot have a stream")
    return RouteConfig(
        path=path,
        list=list_key,
        ack=_choice(_typed(t, "ack", str, "stored", where), ACK_MODES, f"{where}.ack"),
        schema=_resolve(schema, base_dir) if schema is not None else None,
        format=fmt,
        max_body=_positive(parse_size(t.get("max_body", DEFAULT_MAX_BODY), f"{where}.max_body"), f"{where}.max_body"),
        max_lines=_positive(_typed(t, "max_lines", int, DEFAULT_MAX_LINES, where), f"{where}.max_lines"),
        max_depth=_positive(_typed(t, "max_depth", int, DEFAULT_MAX_DEPTH, where), f"{where}.max_depth"),
        auth_tokens_file=_optional_path(t, "auth_tokens_file", where, base_dir),
        webhook_secret_file=_optional_path(t, "webhook_secret_file", where, base_dir),
        webhook_scheme=_choice(_typed(t, "webhook_scheme", str, "standard", where), WEBHOOK_SCHEMES, f"{where}.webhook_scheme"),
        webhook_tolerance=_positive(
            _typed(t, "webhook_tolerance", float, DEFAULT_WEBHOOK_TOLERANCE, where), f"{where}.webhook_tolerance"
        ),
        rate_limit=parse_rate(t["rate_limit"], f"{where}.rate_limit") if "rate_limit" in t else None,
        rate_burst=_positive(_typed(t, "rate_burst", int, None, where), f"{where}.rate_burst") if "rate_burst" in t else None,
        client_rate_limit=(
            parse_rate(t["client_rate_limit"], f"{where}.client_rate_limit") if "client_rate_limit" in t else None
        ),
        client_rate_burst=(
            _positive(_typed(t, "client_rate_burst", int, None, where), f"{where}.client_rate_burst")
            if "client_rate_burst" in t
            else None
        ),
        idempotency_window=(
            parse_duration(t["idempotency_window"], f"{where}.idempotency_window")
            if "idempotency_window" in t
            else DEFAULT_IDEMPOTENCY_WINDOW
        ),
        reply_timeout=reply_timeout,
        stream=stream,
        history=history,
    )


def _optional_path(t: Any, key: str, where: str, base_dir: str) -> Optional[str]:
    value = _typed(t, key, str, None, where)
    return _resolve(value, base_dir) if value is not None else None


def _parse_limits(data: Mapping[str, Any]) -> LimitsConfig:
    t = _table(data, "limits")
    _check_keys(
        t,
        ("max_connections", "max_connections_per_peer", "header_timeout", "body_timeout", "max_header_bytes", "max_headers"),
        "limits",
    )

    def num(key: str, kind: type, default: Any) -> Any:
        return _positive(_typed(t, key, kind, default, "limits"), f"limits.{key}")

    return LimitsConfig(
        max_connections=num("max_connections", int, DEFAULT_MAX_CONNECTIONS),
        max_connections_per_peer=num("max_connections_per_peer", int, DEFAULT_MAX_CONNECTIONS_PER_PEER),
        header_timeout=num("header_timeout", float, DEFAULT_HEADER_TIMEOUT),
        body_timeout=num("body_timeout", float, DEFAULT_BODY_TIMEOUT),
        max_header_bytes=_positive(
            parse_size(t.get("max_header_bytes", DEFAULT_MAX_HEADER_BYTES), "limits.max_header_bytes"),
            "limits.max_header_bytes",
        ),
        max_headers=num("max_headers", int, DEFAULT_MAX_HEADERS),
    )


def _window(value: Any, key: str) -> float:
    """A duration where 0 means "off" (``"0s"``, ``0``)."""
    if value == 0 or (isinstance(value, str) and re.match(r"^\s*0+(\.0*)?\s*(ms|s|m|min|h|d)?\s*$", value)):
        return 0.0
    return parse_duration(value, key)


_COUNTER_KEYS = (
    "name", "list", "key", "value", "hash", "flush_interval", "postgres", "table", "batch_messages", "dedupe_window",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,50}(\.[A-Za-z_][A-Za-z0-9_]{0,50})?$")
_PG_URL_RE = re.compile(r"^postgres(ql)?://[^\s]*$")


def _redis_key(value: str, key: str) -> str:
    from relayd.redis.keys import companion

    if not value:
        raise ConfigError(f"{key}: must not be empty")
    try:
        companion(value.encode("utf-8"), b"x")
    except ValueError:
        raise ConfigError(f"{key}: a '}}' outside a {{hash tag}}: no companion key can share its slot") from None
    return value


def _parse_counter(t: Any, index: int, base_dir: str) -> CounterConfig:
    from relayd.counters.aggregate import PointerError, parse_pointer

    where = f"counter[{index}]"
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: expected a table")
    _check_keys(t, _COUNTER_KEYS, where)
    for required in ("name", "list", "hash"):
        if required not in t:
            raise ConfigError(f"{where}.{required}: missing")
    name = _typed(t, "name", str, None, where)
    if not _NAME_RE.match(name):
        raise ConfigError(f"{where}.name: expected letters, digits, '.', '_' or '-', got {name!r}")
    pointers = {}
    for field in ("key", "value"):
        text = _typed(t, field, str, "/" + field, where)
        try:
            pointers[field] = parse_pointer(text)
        except PointerError as e:
            raise ConfigError(f"{where}.{field}: {e}") from None
    flush = parse_duration(t.get("flush_interval", DEFAULT_FLUSH_INTERVAL), f"{where}.flush_interval")
    if not 0 < flush <= MAX_FLUSH_INTERVAL:
        raise ConfigError(f"{where}.flush_interval: must be > 0 and at most 10s (the staleness promise), got {flush:g}s")
    postgres = _typed(t, "postgres", str, None, where)
    if postgres is not None:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(postgres)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            parts = None
        if parts is None or not _PG_URL_RE.match(postgres) or not (parts.hostname or "host=" in parts.query):
            raise ConfigError(f"{where}.postgres: expected postgresql://user[:password]@host[:port]/db, got a bad URL")
    table = _typed(t, "table", str, DEFAULT_COUNTER_TABLE, where)
    if not _TABLE_RE.match(table):
        raise ConfigError(f"{where}.table: expected a SQL identifier like counters or schema.counters, got {table!r}")
    return CounterConfig(
        name=name,
        list=_redis_key(_typed(t, "list", str, None, where), f"{where}.list"),
        hash=_redis_key(_typed(t, "hash", str, None, where), f"{where}.hash"),
        key=pointers["key"],
        value=pointers["value"],
        flush_interval=flush,
        postgres=postgres,
        table=table,
        batch_messages=_positive(_typed(t, "batch_messages", int, DEFAULT_COUNTER_BATCH, where), f"{where}.batch_messages"),
        dedupe_window=_window(t.get("dedupe_window", DEFAULT_DEDUPE_WINDOW), f"{where}.dedupe_window"),
    )


def _parse_counters(data: Mapping[str, Any], base_dir: str) -> Tuple[CounterConfig, ...]:
    raw = data.get("counter", [])
    if not isinstance(raw, list):
        raise ConfigError("counter: expected [[counter]] tables")
    counters = tuple(_parse_counter(t, i, base_dir) for i, t in enumerate(raw))
    names: dict[str, int] = {}
    lists: dict[str, int] = {}
    for i, c in enumerate(counters):
        if c.name in names:
            raise ConfigError(f"counter[{i}].name: duplicate of counter[{names[c.name]}] ({c.name})")
        if c.list in lists:
            raise ConfigError(f"counter[{i}].list: counter[{lists[c.list]}] already consumes {c.list!r}")
        names[c.name] = i
        lists[c.list] = i
    return counters


_DELIVER_KEYS = (
    "name", "list", "url", "method", "headers", "rate", "concurrency", "timeout", "max_attempts",
    "backoff", "backoff_max", "dead_letter", "sign_secret_file", "visibility_timeout", "breaker_failures",
)
_DELIVER_NAME_RE = re.compile(r"^[A-Za-z0-9._~-]+$")  # one URL path segment: /deliver/<name>/replay
_HTTP_URL_RE = re.compile(r"^https?://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?(/[^\s#]*)?$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token


def _parse_deliver(t: Any, index: int, base_dir: str) -> DeliverConfig:
    where = f"deliver[{index}]"
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: expected a table")
    _check_keys(t, _DELIVER_KEYS, where)
    for required in ("name", "list", "url"):
        if required not in t:
            raise ConfigError(f"{where}.{required}: missing")
    name = _typed(t, "name", str, None, where)
    if not _DELIVER_NAME_RE.match(name):
        raise ConfigError(f"{where}.name: expected letters, digits and ._~- only, got {name!r}")
    list_key = _typed(t, "list", str, None, where)
    if not list_key:
        raise ConfigError(f"{where}.list: must not be empty")
    if "}" in list_key and "{" not in list_key.split("}")[0]:
        raise ConfigError(f"{where}.list: a '}}' outside a {{hash tag}} leaves no slot for companion keys")
    url = _typed(t, "url", str, None, where)
    try:
        port_ok = 0 < (urlsplit(url).port or 80) < 65536
    except ValueError:
        port_ok = False
    if not _HTTP_URL_RE.match(url) or not port_ok:
        raise ConfigError(f"{where}.url: expected an http:// or https:// URL, got {url!r}")
    method = _typed(t, "method", str, "POST", where).upper()
    _choice(method, DELIVER_METHODS, f"{where}.method")
    raw_headers = t.get("headers", {})
    if not isinstance(raw_headers, dict):
        raise ConfigError(f"{where}.headers: expected a table of name = \"value\"")
    headers = []
    for hname, hvalue in raw_headers.items():
        if not _HEADER_NAME_RE.match(hname) or not isinstance(hvalue, str) or any(c in hvalue for c in "\r\n\0"):
            raise ConfigError(f"{where}.headers.{hname}: expected a header name and a one-line string value")
        headers.append((hname, hvalue))
    backoff = parse_duration(t.get("backoff", DEFAULT_DELIVER_BACKOFF), f"{where}.backoff")
    backoff_max = parse_duration(t.get("backoff_max", DEFAULT_DELIVER_BACKOFF_MAX), f"{where}.backoff_max")
    if backoff_max < backoff:
        raise ConfigError(f"{where}.backoff_max: must be >= backoff ({backoff} s), got {backoff_max} s")
    timeout = parse_duration(t.get("timeout", DEFAULT_DELIVER_TIMEOUT), f"{where}.timeout")
    visibility = parse_duration(t.get("visibility_timeout", DEFAULT_DELIVER_VISIBILITY), f"{where}.visibility_timeout")
    dead = _typed(t, "dead_letter", str, list_key + ":dead", where)
    if not dead or dead == list_key:
        raise ConfigError(f"{where}.dead_letter: must be a non-empty list name other than list")
    return DeliverConfig(
        name=name,
        list=list_key,
        url=url,
        method=method,
        headers=tuple(headers),
        rate=parse_rate(t["rate"], f"{where}.rate") if "rate" in t else None,
        concurrency=_positive(_typed(t, "concurrency", int, DEFAULT_DELIVER_CONCURRENCY, where), f"{where}.concurrency"),
        timeout=timeout,
        max_attempts=_positive(
            _typed(t, "max_attempts", int, DEFAULT_DELIVER_MAX_ATTEMPTS, where), f"{where}.max_attempts"
        ),
        backoff=backoff,
        backoff_max=backoff_max,
        dead_letter=dead,
        sign_secret_file=_optional_path(t, "sign_secret_file", where, base_dir),
        visibility_timeout=visibility,
        breaker_failures=_positive(
            _typed(t, "breaker_failures", int, DEFAULT_DELIVER_BREAKER, where), f"{where}.breaker_failures"
        ),
    )


def config_from_string(text: str, base_dir: str = ".") -> Config:
    """Parse and validate config text; relative paths resolve against `base_dir`.

    Pure: no file is opened.  Raises `ConfigError` naming the first bad key.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: not valid TOML: {e}") from None
    _check_keys(data, ("server", "redis", "buffer", "spool", "limits", "route", "deliver", "counter"), "config")
    raw_routes = data.get("route", [])
    if not isinstance(raw_routes, list) or not raw_routes:
        raise ConfigError("route: at least one [[route]] table is required")
    routes = tuple(_parse_route(t, i, base_dir) for i, t in enumerate(raw_routes))
    seen: dict[str, int] = {}
    for i, r in enumerate(routes):
        if r.path in seen:
            raise ConfigError(f"route[{i}].path: duplicate of route[{seen[r.path]}] ({r.path})")
        seen[r.path] = i
    redis = _parse_redis(data)
    for i, r in enumerate(routes):
        if r.stream is not None and redis.cluster:
            # One XREAD names every watched stream; Cluster runs it only within one slot (docs/fanout.md).
            raise ConfigError(f"route[{i}].stream: fan-out needs a single Redis ([redis] url), not a cluster (yet)")
    raw_delivers = data.get("deliver", [])
    if not isinstance(raw_delivers, list):
        raise ConfigError("deliver: expected [[deliver]] tables")
    delivers = tuple(_parse_deliver(t, i, base_dir) for i, t in enumerate(raw_delivers))
    names: dict[str, int] = {}
    for i, d in enumerate(delivers):
        if d.name in names:
            raise ConfigError(f"deliver[{i}].name: duplicate of deliver[{names[d.name]}] ({d.name})")
        names[d.name] = i
    return Config(
        server=_parse_server(data),
        redis=redis,
        buffer=_parse_buffer(data),
        spool=_parse_spool(data, base_dir),
        routes=routes,
        limits=_parse_limits(data),
        delivers=delivers,
        counters=_parse_counters(data, base_dir),
    )


def check_environment(config: Config, compile_schema: Callable[[str, str], Any]) -> Dict[str, Any]:
    """Check what needs the file system; return ``{route path: compiled schema}``.

    `compile_schema(path, key)` loads and compiles one schema file and raises
    `ConfigError` naming `key` when it cannot.
    """
    validators: Dict[str, Any] = {}
    for i, route in enumerate(config.routes):
        if route.schema is not None:
            validators[route.path] = compile_schema(route.schema, f"route[{i}].schema (route {route.path})")
        for key in ("auth_tokens_file", "webhook_secret_file"):
            path = getattr(route, key)
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(f"route[{i}].{key}: cannot read {path}")
    for i, deliver in enumerate(config.delivers):
        if deliver.sign_secret_file is not None and not os.access(deliver.sign_secret_file, os.R_OK):
            raise ConfigError(f"deliver[{i}].sign_secret_file: cannot read {deliver.sign_secret_file}")
    for i, counter in enumerate(config.counters):
        if counter.postgres is not None:
            import importlib.util

            if importlib.util.find_spec("psycopg") is None:
                raise ConfigError(f"counter[{i}].postgres: needs the psycopg package (pip install 'relayd[postgres]')")
    spool_dir = config.spool.dir
    try:
        os.makedirs(spool_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"spool.dir: cannot create {spool_dir}: {e.strerror}") from None
    if not os.access(spool_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"spool.dir: not writable: {spool_dir}")
    return validators


@attrs.frozen
class ConfigOverrides:
    """Command-line overrides of ``[server]`` (``twistd relayd --listen/--admin/--workers``).

    Kept apart from the file's values so that a reload (SIGHUP) re-reads the
    file and applies the same overrides again.
    """

    listen: Optional[str] = None
    admin: Optional[str] = None
    workers: Optional[str] = None  # as typed: an integer >= 1 or "auto"


def apply_overrides(config: Config, overrides: ConfigOverrides) -> Config:
    """`config` with the command line's ``[server]`` overrides; raises `ConfigError` for a bad one."""
    server = config.server
    if overrides.listen:
        server = attrs.evolve(server, listen=with_backlog(overrides.listen, server.backlog))
    if overrides.admin:
        server = attrs.evolve(server, admin=overrides.admin)
    if overrides.workers:
        w = overrides.workers
        if w != "auto" and not (w.isdigit() and int(w) >= 1):
            raise ConfigError(f'--workers: expected an integer >= 1 or "auto", got {w!r}')
        server = attrs.evolve(server, workers=w if w == "auto" else int(w))
    return attrs.evolve(config, server=server)


@attrs.frozen
class LoadedConfig:
    """A config file as loaded: the validated values, its compiled schemas, and its text.

    The text is kept because the supervisor hands each generation of workers
    a snapshot of exactly what it validated (relayd/process/generations.py).
    """

    config: Config
    validators: Dict[str, Any]
    text: str


def load_config(
    path: str, compile_schema: Callable[[str, str], Any], overrides: ConfigOverrides = ConfigOverrides()
) -> LoadedConfig:
    """Read, parse and check the config file at `path`, then apply the command line's `overrides`.

    The one loader: twistd's start, a SIGHUP reload and each worker process
    all read their config through here.  Relative paths inside it resolve
    against the current directory (the daemon's working directory, as for
    twistd's own ``--pidfile``).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: {path} is not UTF-8") from None
    config = config_from_string(text, base_dir=os.getcwd())
    validators = check_environment(config, compile_schema)
    return LoadedConfig(apply_overrides(config, overrides), validators, text)


def resolve_workers(workers: Union[int, str]) -> int:
    """``"auto"`` -> the CPUs this process may run on; an int stays."""
    if workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    return int(workers)
