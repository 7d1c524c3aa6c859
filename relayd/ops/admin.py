"""The admin listener: liveness, readiness and Prometheus metrics.

Kept off the ingest port so probes and scrapes never compete with (or get
rate-limited like) client traffic, and so it can bind to localhost only.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Union

import ujson
from klein import Klein
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.web.server import Request

PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class AdminApp:
    """`/healthz`, `/readyz`, `/metrics`.

    Serves one process (a `Metrics` registry and its checks) or, in the
    supervisor of a multi-worker daemon, the merged view of all workers:
    `metrics.exposition()` and `readiness()` may return Deferreds.
    """

    _app = Klein()

    def __init__(
        self,
        metrics: Any,
        readiness: Callable[[], Union[Dict[str, bool], Deferred[Dict[str, bool]]]],
        details: Optional[Callable[[], Dict[str, Any]]] = None,
    ) -> None:
        """`readiness()` returns named checks (or a Deferred of them); ready when all are true.

        `details()`, when given, adds JSON fields to `/readyz`'s body that
        say more than a boolean can (a cluster's unwritable slot ranges).
        """
        self._metrics = metrics
        self._readiness = readiness
        self._details = details

    @_app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: Request) -> bytes:
        """200 while the process runs its reactor."""
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"status":"OK"}'

    @_app.route("/readyz", methods=["GET", "HEAD"])
    def readyz(self, request: Request) -> Any:
        """200 when every readiness check passes, else 503 naming the failing ones."""

        def answer(checks: Dict[str, bool]) -> bytes:
            ready = bool(checks) and all(checks.values())
            request.setResponseCode(200 if ready else 503)
            request.setHeader(b"Content-Type", b"application/json")
            if not ready:
                request.setHeader(b"Retry-After", b"1")
            body: Dict[str, Any] = {"status": "OK" if ready else "NOT READY", "checks": checks}
            if self._details is not None:
                body.update(self._details())
            return ujson.dumps(body).encode()

        checks = self._readiness()
        if isinstance(checks, Deferred):
            return checks.addCallback(answer)
        return answer(checks)

    @_app.route("/metrics", methods=["GET"])
    def metrics(self, request: Request) -> Any:
        """Prometheus text exposition (this process's registry, or all workers merged)."""
        request.setHeader(b"Content-Type", PROMETHEUS_CONTENT_TYPE)
        return maybeDeferred(self._metrics.exposition)

    def resource(self) -> Any:
        """The twisted.web resource of this app."""
        return self._app.resource()
