"""Wire formats: the envelope pushed to Redis and NDJSON batch splitting.

The envelope is what consumers read (the product contract)::

    {"id": "...", "ts": 1700000000.123, "route": "/leads",
     "content_type": "application/json", "body": <JSON value or string>}

It is produced with a single ``ujson.dumps`` per message (about 1.5 us for a
200 B body); `allow_nan=False` keeps NaN/Infinity out, so every item in
Redis is strict JSON whatever ujson's lenient parser let in.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple

import ujson


class EncodeError(ValueError):
    """The value cannot be represented as strict JSON (NaN, lone surrogate)."""


def encode_envelope(
    message_id: str, ts: float, route: str, content_type: Optional[str], body: Any
) -> bytes:
    """Serialize one envelope to UTF-8 JSON bytes."""
    try:
        return ujson.dumps(
            {"id": message_id, "ts": ts, "route": route, "content_type": content_type, "body": body},
            ensure_ascii=False,
            escape_forward_slashes=False,
            allow_nan=False,
        ).encode("utf-8")
    except (OverflowError, UnicodeEncodeError) as e:
        raise EncodeError(str(e)) from None


def decode_envelope(item: bytes) -> Dict[str, Any]:
    """Parse an envelope back (for consumers, tests and the CLI)."""
    env = ujson.loads(item)
    if not isinstance(env, dict) or not {"id", "ts", "route", "content_type", "body"} <= env.keys():
        raise ValueError("not a relayd envelope")
    return env


def split_ndjson(body: bytes) -> Iterator[Tuple[int, bytes]]:
    """Yield ``(line_number, line)`` for every non-blank line, 1-based.

    Lines end with LF; a trailing CR is stripped (CRLF senders).  Numbers
    count blank lines too, so an error names the line the sender sees.
    """
    for number, line in enumerate(body.split(b"\n"), 1):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip():
            yield number, line
