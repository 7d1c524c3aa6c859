"""The reply a consumer pushes to ``reply_to``, checked before it reaches a client.

A consumer answers a request envelope with ``LPUSH <reply_to> <reply>``::

    {"id": "<the request's id>", "status": 200,
     "headers": {"Content-Type": "..."}, "body": <JSON value or string>}

``status`` defaults to 200 and must be an integer in 200..599; ``headers``
is optional and maps strings to strings.  Hop-by-hop headers and
``Content-Length`` are relayd's business, not the worker's, and are dropped.
A string body is sent as its UTF-8 bytes (``text/plain; charset=utf-8``
unless the worker names a type); any other JSON value is sent as JSON.
"""

from __future__ import annotations

import re
from typing import Any, List, Optional, Tuple

import attrs
import ujson

#: RFC 9110 section 7.6.1 connection-specific fields, plus the framing
#: headers relayd computes itself.
DROPPED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
TEXT_TYPE = b"text/plain; charset=utf-8"
JSON_TYPE = b"application/json"


class MalformedReply(ValueError):
    """A reply that cannot be relayed; `request_id` is set when its id was readable."""

    def __init__(self, reason: str, request_id: Optional[str] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


@attrs.frozen
class Reply:
    """A checked reply, ready to become an HTTP response."""

    request_id: str
    status: int
    headers: Tuple[Tuple[bytes, bytes], ...]
    body: bytes


def parse_reply(raw: bytes) -> Reply:
    """Check one reply item; `MalformedReply` says why it cannot be relayed."""
    try:
        doc = ujson.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise MalformedReply("not JSON") from None
    if not isinstance(doc, dict):
        raise MalformedReply("not a JSON object")
    request_id = doc.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise MalformedReply("no string id")
    status = doc.get("status", 200)
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise MalformedReply(f"status {status!r} is not an integer in 200..599", request_id)
    headers_doc = doc.get("headers", {})
    if not isinstance(headers_doc, dict):
        raise MalformedReply("headers is not an object", request_id)
    headers: List[Tuple[bytes, bytes]] = []
    content_type: Optional[bytes] = None
    for name, value in headers_doc.items():
        if not isinstance(value, str):
            raise MalformedReply(f"header {name!r} is not a string", request_id)
        if not _is_token(name) or "\r" in value or "\n" in value:
            raise MalformedReply(f"header {name!r} is not a valid field", request_id)
        lower = name.lower()
        if lower in DROPPED_HEADERS:
            continue
        if lower == "content-type":
            content_type = value.encode("latin-1", "replace")
            continue
        headers.append((name.encode("ascii"), value.encode("latin-1", "replace")))
    body_value: Any = doc.get("body", "")
    if isinstance(body_value, str):
        body = body_value.encode("utf-8", "surrogatepass")
        default_type = TEXT_TYPE
    else:
        body = ujson.dumps(body_value, ensure_ascii=False, escape_forward_slashes=False).encode("utf-8")
        default_type = JSON_TYPE
    headers.append((b"Content-Type", content_type or default_type))
    return Reply(request_id, status, tuple(headers), body)


#: RFC 9110 token (a field name); one regex match is ~5x cheaper than a per-character loop.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _is_token(name: str) -> bool:
    return _TOKEN.fullmatch(name) is not None
