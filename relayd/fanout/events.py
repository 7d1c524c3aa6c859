"""Server-Sent Events wire format and Redis Stream entry ids.

Stream ids (``<ms>-<seq>``) are compared as ``(ms, seq)`` tuples: Redis
orders them that way, and the string order is wrong (``9-0`` > ``10-0``).
"""

from __future__ import annotations

import re
from typing import Tuple

StreamId = Tuple[int, int]

_ID_RE = re.compile(rb"(\d{1,20})-(\d{1,20})\Z")
_U64 = 1 << 64

HEARTBEAT = b": ping\n\n"
ZERO: StreamId = (0, 0)


def parse_id(raw: bytes) -> StreamId:
    """``b"1700000000000-3"`` -> ``(1700000000000, 3)``; ValueError if malformed."""
    m = _ID_RE.match(raw)
    if m is None:
        raise ValueError("not a stream id like 1700000000000-0")
    ms, seq = int(m.group(1)), int(m.group(2))
    if ms >= _U64 or seq >= _U64:
        raise ValueError("stream id part out of range")
    return ms, seq


def format_id(sid: StreamId) -> bytes:
    """Inverse of `parse_id`."""
    return b"%d-%d" % sid


def encode_event(entry_id: bytes, data: bytes) -> bytes:
    """One SSE event (``id:`` + ``data:`` lines), encoded once per entry.

    Envelopes are one line of JSON; a raw body (``format = "body"``) may
    hold line breaks, which SSE carries as one ``data:`` line per line.
    """
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return b"id: " + entry_id + b"\n" + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    return b"id: " + entry_id + b"\ndata: " + data + b"\n\n"


def retry_field(milliseconds: int) -> bytes:
    """The ``retry:`` field telling browsers how long to wait before reconnecting."""
    return b"retry: %d\n\n" % milliseconds


def envelope_ts(data: bytes) -> float:
    """The ingest ``ts`` of a relayd envelope without parsing the JSON (0.0 if none).

    Envelopes start ``{"id":"<hex>","ts":<float>,``: a find and a float
    parse per event, not a JSON decode.
    """
    start = data.find(b'"ts":', 0, 64)
    if start < 0:
        return 0.0
    end = data.find(b",", start)
    try:
        return float(data[start + 5 : end])
    except ValueError:
        return 0.0
