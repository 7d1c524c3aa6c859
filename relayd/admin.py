"""The admin listener: liveness, readiness and Prometheus metrics.

Kept off the ingest port so probes and scrapes never compete with (or get
rate-limited like) client traffic, and so it can bind to localhost only.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import ujson
from klein import Klein
from twisted.web.server import Request

from relayd.metrics import Metrics

PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class AdminApp:
    """`/healthz`, `/readyz`, `/metrics`."""

    _app = Klein()

    def __init__(self, metrics: Metrics, readiness: Callable[[], Dict[str, bool]]) -> None:
        """`readiness()` returns named checks; ready when all are true."""
        self._metrics = metrics
        self._readiness = readiness

    @_app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: Request) -> bytes:
        """200 while the process runs its reactor."""
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"status":"OK"}'

    @_app.route("/readyz", methods=["GET", "HEAD"])
    def readyz(self, request: Request) -> bytes:
        """200 when every readiness check passes, else 503 naming the failing ones."""
        checks = self._readiness()
        ready = all(checks.values())
        request.setResponseCode(200 if ready else 503)
        request.setHeader(b"Content-Type", b"application/json")
        if not ready:
            request.setHeader(b"Retry-After", b"1")
        return ujson.dumps({"status": "OK" if ready else "NOT READY", "checks": checks}).encode()

    @_app.route("/metrics", methods=["GET"])
    def metrics(self, request: Request) -> bytes:
        """Prometheus text exposition of this process's registry."""
        request.setHeader(b"Content-Type", PROMETHEUS_CONTENT_TYPE)
        return self._metrics.exposition()

    def resource(self) -> Any:
        """The twisted.web resource of this app."""
        return self._app.resource()
