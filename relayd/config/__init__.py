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

The package, one concern per module:

``model``     the frozen values (`Config` and one class per section) and every default
``values``    parsers shared by all sections (sizes, durations, rates, typed keys, paths)
``sections``  ``[server]``, ``[redis]``, ``[buffer]``, ``[spool]``, ``[limits]``, ``[[route]]``
``features``  ``[[counter]]`` and ``[[deliver]]``
this module   the whole file (`config_from_string`), the environment checks,
              command-line overrides and `load_config`
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Union

import attrs

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - pypy3 (3.9) keeps working
    import tomli as tomllib  # type: ignore[no-redef]

from relayd.config.features import _parse_counters, _parse_deliver
from relayd.config.model import (
    DEFAULT_BACKLOG,
    BufferConfig,
    Config,
    ConfigError,
    CounterConfig,
    DeliverConfig,
    LimitsConfig,
    RedisConfig,
    RouteConfig,
    ServerConfig,
    SpoolConfig,
)
from relayd.config.sections import _parse_buffer, _parse_limits, _parse_redis, _parse_route, _parse_server, _parse_spool
from relayd.config.values import _check_keys, parse_duration, parse_rate, parse_size, with_backlog

__all__ = [
    "DEFAULT_BACKLOG", "BufferConfig", "Config", "ConfigError", "ConfigOverrides", "CounterConfig", "DeliverConfig",
    "LimitsConfig", "LoadedConfig", "RedisConfig", "RouteConfig", "ServerConfig", "SpoolConfig", "apply_overrides",
    "check_environment", "config_from_string", "load_config", "parse_duration", "parse_rate", "parse_size",
    "resolve_workers", "with_backlog",
]


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

