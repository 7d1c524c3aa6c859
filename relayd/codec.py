"""Wire formats: the envelope pushed to Redis and NDJSON batch splitting.

The envelope is what consumers read (the product contract)::

    {"id": "...", "ts": 1700000000.123, "route": "/leads",
     "content_type": "application/json", "body": <JSON value or string>}

It is produced with a single ``ujson.dumps`` per message (about 1.5 us for a
200 B body); `allow_nan=False` keeps NaN/Infinity out, so every item in
Redis is strict JSON whatever ujson's lenient parser let in.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Iterator, List, Optional, Tuple

import ujson


class EncodeError(ValueError):
    """The value cannot be represented as strict JSON (NaN, lone surrogate)."""


_ENVELOPE = b'{"id":"%s","ts":%s,"route":%s,"content_type":%s,"body":%s}'
#: `_ENVELOPE` with the shared fields filled first, leaving the id and an object body's inside.
_ENVELOPE_OBJECT = b'{"id":"%%s","ts":%s,"route":%s,"content_type":%s,"body":{%%s}}'


_dumps = functools.partial(ujson.dumps, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False)


def _json(value: Any) -> bytes:
    return _dumps(value).encode("utf-8")


#: Batches at least this long try `_encode_objects` (one ujson call for all bodies).
_BATCH_MIN = 4


def _encode_objects(bodies: List[Any]) -> Optional[List[bytes]]:
    """Every body's JSON (as the per-body encoder writes it) from one ujson call, or None.

    ``ujson.dumps`` spends more on its call (keyword parsing, setup) than on
    a 200 B object, so a batch of objects is encoded as one list and cut at
    its ``},{`` boundaries.  The cut is exact only if ``},{`` occurs nowhere
    but between the top-level objects; those n-1 boundaries are always
    there, so exactly n parts prove it (a string or a nested object holding
    ``},{`` makes more: None, and the caller encodes body by body).  None as well for anything but a list of dicts, and for what
    the per-body encoder refuses (NaN, Infinity, overflow, lone surrogates),
    so that it raises the error that names the problem.
    """
    n = len(bodies)
    if set(map(type, bodies)) != {dict}:
        return None
    try:
        data = _dumps(bodies).encode("utf-8")
    except (OverflowError, UnicodeEncodeError, ValueError):
        return None
    parts = data.split(b"},{")
    if len(parts) != n:
        return None
    # "[{" ... "}]": trimmed on the end pieces (one piece when n is 1), not
    # by slicing the whole (a second copy of a batch-sized buffer).
    parts[0] = parts[0][2:]
    parts[-1] = parts[-1][:-2]
    return parts


@functools.lru_cache(maxsize=256)
def _json_text(value: Optional[str]) -> bytes:
    """A route or media type as JSON; the few distinct values are memoized (pure)."""
    return _json(value)


def encode_envelopes(
    ids: List[str],
    ts: float,
    route: str,
    content_type: Optional[str],
    bodies: List[Any],
    reply_to: Optional[bytes] = None,
) -> List[bytes]:
    """Serialize the envelopes of one request (shared ts, route, type).

    The shared fields are encoded once per request and each body once per
    message, spliced into a fixed template: ~25% cheaper than one
    ``ujson.dumps`` of a fresh dict per message.  Ids are hex, so they need
    no escaping.  `reply_to` (request/reply routes) adds ``"reply_to"``.
    """
    ctype = _json_text(content_type)
    if reply_to is not None:
        ctype += b',"reply_to":' + _json(reply_to.decode("utf-8"))
    head = (b"%.6f" % ts, _json_text(route), ctype)
    if len(bodies) >= _BATCH_MIN:
        objects = _encode_objects(bodies)
        if objects is not None:
            # One template with the shared fields filled in (a "%" in them
            # doubled), then one C-level formatting per message.
            template = (_ENVELOPE_OBJECT % tuple(h.replace(b"%", b"%%") for h in head))
            return list(map(template.__mod__, zip(map(str.encode, ids), objects)))
    try:
        return [_ENVELOPE % ((i.encode("ascii"),) + head + (_json(b),)) for i, b in zip(ids, bodies)]
    except (OverflowError, UnicodeEncodeError) as e:
        raise EncodeError(str(e)) from None


def encode_envelope(message_id: str, ts: float, route: str, content_type: Optional[str], body: Any) -> bytes:
    """Serialize one envelope to UTF-8 JSON bytes."""
    return encode_envelopes([message_id], ts, route, content_type, [body])[0]


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
