"""Value parsers shared by every section: sizes, durations, rates, typed keys, paths; each error names its key."""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Tuple

from relayd.config.model import _BACKLOG_KINDS, ConfigError

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


def with_backlog(endpoint: str, backlog: int) -> str:
    """`endpoint` with ``:backlog=N`` added when it is a listening kind that sets none.

    ``tcp:8080`` -> ``tcp:8080:backlog=1024``; ``systemd:...`` (the socket
    unit's ListenBacklog decides) and strings that set one are unchanged.
    """
    kind = endpoint.split(":", 1)[0].strip().lower()
    if kind in _BACKLOG_KINDS and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={backlog}"
    return endpoint


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


def _optional_path(t: Any, key: str, where: str, base_dir: str) -> Optional[str]:
    value = _typed(t, key, str, None, where)
    return _resolve(value, base_dir) if value is not None else None


def _window(value: Any, key: str) -> float:
    """A duration where 0 means "off" (``"0s"``, ``0``)."""
    if value == 0 or (isinstance(value, str) and re.match(r"^\s*0+(\.0*)?\s*(ms|s|m|min|h|d)?\s*$", value)):
        return 0.0
    return parse_duration(value, key)


