"""Structured logging: JSON lines for journald, text for a terminal.

Every event goes through `twisted.logger`; this module only decides how it
is written.  On a TTY an operator reads text; otherwise (systemd, a pipe)
each event is one JSON object per line, which journald stores as one entry
and ``jq`` can query.  Every event carries the process role and, in a worker
process, the worker index (``"worker": 1``), so the journal of a
multi-process daemon can be split by worker.

Per-message events do not exist anywhere in relayd (a log line per request
costs a third of the request); what is logged here is lifecycle, errors and
mode changes.

Use with twistd: ``twistd -n --logger relayd.ops.logs.observer relayd ...``;
worker processes install it themselves.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any, Dict, Optional

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python.failure import Failure

#: Added to every event of this process by `observer` (``role``, ``worker``).
PROCESS_FIELDS: Dict[str, Any] = {"role": "main"}


def set_process_fields(**fields: Any) -> None:
    """Set the fields stamped on every event (``role="worker", worker=1``)."""
    PROCESS_FIELDS.clear()
    PROCESS_FIELDS.update(fields)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def event_as_json(event: Dict[str, Any]) -> str:
    """One event as a JSON line: time, level, namespace, msg, process fields, plain keyword fields."""
    level = event.get("log_level")
    out: Dict[str, Any] = {
        "time": event.get("log_time"),
        "level": level.name if isinstance(level, type(LogLevel.info)) else str(level),
        "ns": event.get("log_namespace"),
        "msg": formatEvent(event),
    }
    out.update(PROCESS_FIELDS)
    for key, value in event.items():
        if key.startswith("log_") or key in out or key in ("format", "message", "isError", "system", "time"):
            continue
        out[key] = _jsonable(value)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        out["traceback"] = failure.getTraceback()
    return json.dumps(out, separators=(",", ":")) + "\n"


def _classic_with_fields(event: Dict[str, Any]) -> Optional[str]:
    text = formatEventAsClassicLogText(event)
    if text is None or "worker" not in PROCESS_FIELDS:
        return text
    return f"[worker {PROCESS_FIELDS['worker']}] {text}"


def make_observer(stream: Optional[IO[str]] = None, json_lines: Optional[bool] = None) -> ILogObserver:
    """An observer writing to `stream` (stdout): JSON lines unless it is a TTY."""
    stream = sys.stdout if stream is None else stream
    if json_lines is None:
        try:
            json_lines = not stream.isatty()
        except (AttributeError, ValueError):
            json_lines = True
    return FileLogObserver(stream, event_as_json if json_lines else _classic_with_fields)


def observer() -> ILogObserver:
    """Log observer factory for ``twistd --logger relayd.ops.logs.observer``."""
    return make_observer()
