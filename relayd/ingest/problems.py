"""RFC 9457 problem documents: every client error is one of these.

Handlers raise a `Problem`; one place (`render_problem`) turns it into an
``application/problem+json`` response.  Each problem type has a stable URI
under ``https://relayd.dev/problems/`` (a name, not a fetched page) so
clients can switch on ``type`` rather than parse ``detail``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import ujson

PROBLEM_CONTENT_TYPE = b"application/problem+json"
_TYPE_BASE = "https://relayd.dev/problems/"


class Problem(Exception):
    """A client-visible error; nothing was enqueued when one is raised."""

    status = 500
    title = "Internal error"
    slug = "internal"
    reason = "internal"  # label of relayd_rejected_total

    def __init__(
        self,
        detail: str,
        *,
        retry_after: Optional[int] = None,
        headers: Tuple[Tuple[bytes, bytes], ...] = (),
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.headers = headers
        self.extensions = extensions

    def document(self, instance: Optional[str] = None) -> Dict[str, Any]:
        """The JSON object of the problem (RFC 9457 members + extensions)."""
        doc: Dict[str, Any] = {
            "type": _TYPE_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance is not None:
            doc["instance"] = instance
        doc.update(self.extensions)
        return doc


def _problem(name: str, status: int, title: str, slug: str, reason: str) -> type:
    return type(name, (Problem,), {"status": status, "title": title, "slug": slug, "reason": reason})


MalformedJSON = _problem("MalformedJSON", 400, "Malformed JSON", "malformed-json", "malformed_json")
SchemaViolation = _problem("SchemaViolation", 400, "Schema violation", "schema-violation", "schema")
InvalidBatch = _problem("InvalidBatch", 400, "Invalid batch", "invalid-batch", "invalid_batch")
BadRequest = _problem("BadRequest", 400, "Bad request", "bad-request", "bad_request")
Unauthorized = _problem("Unauthorized", 401, "Unauthorized", "unauthorized", "unauthorized")
Forbidden = _problem("Forbidden", 403, "Forbidden", "forbidden", "forbidden")
RequestTimeout = _problem("RequestTimeout", 408, "Request timeout", "request-timeout", "timeout")
HeadersTooLarge = _problem(
    "HeadersTooLarge", 431, "Request header fields too large", "headers-too-large", "headers_too_large"
)
TooManyRequests = _problem("TooManyRequests", 429, "Too many requests", "rate-limited", "rate_limited")
TooManyConnections = _problem(
    "TooManyConnections", 503, "Too many connections", "too-many-connections", "connections"
)
NotFound = _problem("NotFound", 404, "Not found", "not-found", "not_found")
MethodNotAllowed = _problem("MethodNotAllowed", 405, "Method not allowed", "method-not-allowed", "method")
NotAcceptable = _problem("NotAcceptable", 406, "Not acceptable", "not-acceptable", "not_acceptable")
LengthRequired = _problem("LengthRequired", 411, "Length required", "length-required", "length_required")
PayloadTooLarge = _problem("PayloadTooLarge", 413, "Payload too large", "payload-too-large", "too_large")
UnsupportedMediaType = _problem(
    "UnsupportedMediaType", 415, "Unsupported media type", "unsupported-media-type", "media_type"
)
Overloaded = _problem("Overloaded", 503, "Overloaded", "overloaded", "overloaded")
NotReady = _problem("NotReady", 503, "Not ready", "not-ready", "not_ready")
StoreTimeout = _problem("StoreTimeout", 503, "Not stored in time", "store-timeout", "store_timeout")
GatewayTimeout = _problem("GatewayTimeout", 504, "Gateway timeout", "reply-timeout", "reply_timeout")
BadGateway = _problem("BadGateway", 502, "Bad gateway", "bad-reply", "bad_reply")
#: The one 503 that may not leave things unchanged: the spool's fsync failed
#: after the records were written, so replay may still deliver them.
StoreFailed = _problem("StoreFailed", 503, "Storage failed", "store-failed", "store_failed")


def render_problem(problem: Problem, instance: Optional[str] = None) -> bytes:
    """Serialize a problem document."""
    return ujson.dumps(problem.document(instance), ensure_ascii=False, escape_forward_slashes=False).encode()
