"""The feature sections: ``[[counter]]`` (relayd/counters/) and ``[[deliver]]`` (relayd/deliver/)."""

from __future__ import annotations

import re
from typing import Any, Mapping, Tuple
from urllib.parse import urlsplit

from relayd.config.model import (
    DEFAULT_COUNTER_BATCH,
    DEFAULT_COUNTER_TABLE,
    DEFAULT_DEDUPE_WINDOW,
    DEFAULT_DELIVER_BACKOFF,
    DEFAULT_DELIVER_BACKOFF_MAX,
    DEFAULT_DELIVER_BREAKER,
    DEFAULT_DELIVER_CONCURRENCY,
    DEFAULT_DELIVER_MAX_ATTEMPTS,
    DEFAULT_DELIVER_TIMEOUT,
    DEFAULT_DELIVER_VISIBILITY,
    DEFAULT_FLUSH_INTERVAL,
    DELIVER_METHODS,
    MAX_FLUSH_INTERVAL,
    ConfigError,
    CounterConfig,
    DeliverConfig,
)
from relayd.config.values import (
    _check_keys,
    _choice,
    _optional_path,
    _positive,
    _typed,
    _window,
    parse_duration,
    parse_rate,
)

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


