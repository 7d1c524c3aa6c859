"""What one list item means: the request it becomes, its retry state, its dead letter.

Items are whatever was LPUSHed: usually relayd envelopes (``{"id", "ts",
"route", "content_type", "body"}``), but also anything another producer
pushed -- not JSON, not UTF-8.  Every item maps to a request (never a crash
loop on a strange item), following CONTRACT.md:

- an envelope sends its ``body`` (a string's UTF-8 bytes, or the JSON value
  re-encoded) with its ``content_type``, and its ``id`` is the message id;
- any other item is sent as it is: ``application/json`` when it parses as
  JSON, else ``application/octet-stream``; its id is a stable digest.

Retry state travels *with* the item: a message waiting for a retry, or put
back after one, is the original item behind a small binary header
(`RETRY_MAGIC`, attempts, first attempt time, a nonce).  So attempts survive
restarts and a crash between two Redis commands without a side table to
keep consistent.  The header starts with NUL bytes, which no JSON or text
item does.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional, Tuple

import attrs
import ujson

#: Marks an item that carries retry state (version 1 of the header).
RETRY_MAGIC = b"\x00rdr1\x00"

JSON = "application/json"
OCTETS = "application/octet-stream"


def _dumps(value: Any) -> str:
    return ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False)


@attrs.frozen
class Request:
    """The HTTP request one item becomes."""

    message_id: str
    body: bytes
    content_type: str
    ts: Optional[float]  # the envelope's enqueue time, when there is one


@attrs.frozen
class Claimed:
    """An item as claimed from the list: the raw bytes in Redis and what they hold."""

    raw: bytes  # exactly as in the processing list (LREM needs it)
    item: bytes  # the original item, without a retry header
    attempts: int  # attempts already made before this claim
    first_ts: Optional[float]  # time of the first attempt, when there was one


def wrap_retry(item: bytes, attempts: int, first_ts: float) -> bytes:
    """The original `item` with its retry state in front (see the module docstring)."""
    return RETRY_MAGIC + b"%d %.3f %s\n" % (attempts, first_ts, os.urandom(4).hex().encode()) + item


def parse_claimed(raw: bytes) -> Claimed:
    """Split a claimed item into its retry state and the original item."""
    if raw.startswith(RETRY_MAGIC):
        end = raw.find(b"\n", len(RETRY_MAGIC))
        if end != -1:
            try:
                attempts_s, ts_s, _nonce = raw[len(RETRY_MAGIC) : end].split(b" ")
                return Claimed(raw, raw[end + 1 :], int(attempts_s), float(ts_s))
            except ValueError:
                pass  # not our header after all: deliver the item as it is
    return Claimed(raw, raw, 0, None)


def _parse_json(item: bytes) -> Tuple[bool, Any]:
    try:
        return True, ujson.loads(item)
    except (ValueError, UnicodeDecodeError):
        return False, None


def is_envelope(value: Any) -> bool:
    """A relayd envelope: an object with a string id and a body."""
    return isinstance(value, dict) and isinstance(value.get("id"), str) and "body" in value and bool(value["id"])


def item_digest(item: bytes) -> str:
    """A stable id for an item that carries none (same bytes, same id)."""
    return "sha256-" + hashlib.sha256(item).hexdigest()[:40]


def to_request(item: bytes) -> Request:
    """The request for one original item (CONTRACT.md "What is sent")."""
    ok, value = _parse_json(item)
    if ok and is_envelope(value):
        body = value["body"]
        data = body.encode("utf-8") if isinstance(body, str) else _dumps(body).encode("utf-8")
        ctype = value.get("content_type")
        if not isinstance(ctype, str) or not ctype or any(c in ctype for c in "\r\n\0"):
            ctype = "text/plain; charset=utf-8" if isinstance(body, str) else JSON
        ts = value.get("ts")
        return Request(
            value["id"][:255],
            data,
            ctype,
            float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None,
        )
    return Request(item_digest(item), item, JSON if ok else OCTETS, None)


def enqueued_at(item: bytes) -> Optional[float]:
    """The envelope's ``ts`` of a raw list item (for the queue-lag gauge), if any."""
    claimed = parse_claimed(item)
    ok, value = _parse_json(claimed.item)
    if ok and is_envelope(value):
        ts = value.get("ts")
        if isinstance(ts, (int, float)) and not isinstance(ts, bool):
            return float(ts)
    return None


# -- dead letters ---------------------------------------------------------------

#: How a dead letter's "message" field maps back to the item's bytes on replay.
KIND_JSON, KIND_TEXT, KIND_BYTES = "json", "text", "latin-1"


def dead_letter(
    item: bytes, status: Optional[int], detail: str, attempts: int, first_ts: float, last_ts: float
) -> bytes:
    """The dead-letter item: ``{"message": ..., "error": {...}}`` (CONTRACT.md).

    ``message`` is the item's JSON value if it was JSON, else its text.  An
    item that is not UTF-8 becomes its Latin-1 text (every byte one code
    point), and ``error.item`` says which, so that replay restores the exact
    bytes; a JSON item is replayed as its value re-encoded.
    """
    ok, value = _parse_json(item)
    if ok:
        message, kind = value, KIND_JSON
    else:
        try:
            message, kind = item.decode("utf-8"), KIND_TEXT
        except UnicodeDecodeError:
            message, kind = item.decode("latin-1"), KIND_BYTES
    error = {
        "status": status,
        "detail": detail,
        "attempts": attempts,
        "first_ts": round(first_ts, 3),
        "last_ts": round(last_ts, 3),
        "item": kind,
    }
    return _dumps({"message": message, "error": error}).encode("utf-8")


def replayed_item(dead: bytes) -> bytes:
    """The list item a dead letter goes back as (its original message).

    Anything that is not a dead letter of ours (pushed there by hand) is
    replayed as it is.
    """
    ok, value = _parse_json(dead)
    if not ok or not isinstance(value, dict) or "message" not in value or not isinstance(value.get("error"), dict):
        return dead
    message, kind = value["message"], value["error"].get("item", KIND_JSON)
    if kind == KIND_TEXT and isinstance(message, str):
        return message.encode("utf-8")
    if kind == KIND_BYTES and isinstance(message, str):
        return message.encode("latin-1")
    return _dumps(message).encode("utf-8")
