"""The core sections: ``[server]``, ``[redis]``, ``[buffer]``, ``[spool]``, ``[limits]`` and ``[[route]]``."""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Tuple
from urllib.parse import unquote

from relayd.config.model import (
    ACK_MODES,
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_ADMIN,
    DEFAULT_BACKLOG,
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_MESSAGES,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_BUFFER_BYTES,
    DEFAULT_BUFFER_MESSAGES,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_HISTORY,
    DEFAULT_IDEMPOTENCY_WINDOW,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LISTEN,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_PEER,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_LINES,
    DEFAULT_REDIS_URL,
    DEFAULT_REPLY_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_SPOOL_BYTES,
    DEFAULT_SPOOL_DIR,
    DEFAULT_WEBHOOK_TOLERANCE,
    FORMATS,
    BufferConfig,
    ConfigError,
    LimitsConfig,
    RedisConfig,
    RouteConfig,
    ServerConfig,
    SpoolConfig,
)
from relayd.config.values import (
    _check_keys,
    _choice,
    _optional_path,
    _positive,
    _resolve,
    _table,
    _typed,
    parse_duration,
    parse_rate,
    parse_size,
    with_backlog,
)
from relayd.ingest.paths import TemplateError, path_names
from relayd.spool.segments import FSYNC_POLICIES  # the spool owns its policy names (a leaf module: no cycle)

_REDIS_URL_RE = re.compile(
    r"^redis://(?:(?P<user>[^:@/]*)(?::(?P<password>[^@/]*))?@)?"
    r"(?P<host>\[[0-9a-fA-F:]+\]|[^:/@]+)(?::(?P<port>\d+))?(?:/(?P<db>\d+)?)?$"
)


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


