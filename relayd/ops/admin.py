"""The admin listener: liveness, readiness, Prometheus metrics, delivery admin.

Kept off the ingest port so probes and scrapes never compete with (or get
rate-limited like) client traffic, and so it can bind to localhost only.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Union

import ujson
from klein import Klein
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.server import Request, Site

from relayd.ingest.problems import PROBLEM_CONTENT_TYPE, NotFound, NotReady, Problem, render_problem

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
        deliver: Optional[Any] = None,
    ) -> None:
        """`readiness()` returns named checks (or a Deferred of them); ready when all are true.

        `details()`, when given, adds JSON fields to `/readyz`'s body that
        say more than a boolean can (a cluster's unwritable slot ranges).
        `deliver` answers ``/deliver`` (relayd/deliver/admin.py, or the
        supervisor's merge of its workers): ``async status()`` and
        ``async replay(name) -> count or None``.
        """
        self._metrics = metrics
        self._readiness = readiness
        self._details = details
        self._deliver = deliver

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

    def _problem(self, request: Request, problem: Problem) -> bytes:
        request.setResponseCode(problem.status)
        request.setHeader(b"Content-Type", PROBLEM_CONTENT_TYPE)
        if problem.retry_after is not None:
            request.setHeader(b"Retry-After", b"%d" % problem.retry_after)
        return render_problem(problem, request.path.decode("utf-8", "replace"))

    @_app.route("/deliver", methods=["GET"])
    async def deliver_status(self, request: Request) -> bytes:
        """JSON per deliver: queued, in_flight, waiting_for_retry, dead, state."""
        if self._deliver is None:
            return self._problem(request, NotFound("no [[deliver]] configured"))
        try:
            status = await self._deliver.status()
        except Exception as e:  # Redis down: the numbers live there
            return self._problem(request, NotReady(f"cannot read delivery state: {e}", retry_after=1))
        request.setHeader(b"Content-Type", b"application/json")
        return ujson.dumps(status).encode()

    @_app.route("/deliver/<string:name>/replay", methods=["POST"])
    async def deliver_replay(self, request: Request, name: str) -> bytes:
        """Move every dead letter of deliver `name` back to its list; answers the count."""
        if self._deliver is None:
            return self._problem(request, NotFound("no [[deliver]] configured"))
        try:
            count = await self._deliver.replay(name)
        except Exception as e:
            return self._problem(request, NotReady(f"replay failed: {e}", retry_after=1))
        if count is None:
            return self._problem(request, NotFound(f"no deliver named {name!r}"))
        request.setHeader(b"Content-Type", b"application/json")
        return ujson.dumps({"status": "OK", "deliver": name, "replayed": count}).encode()

    def resource(self) -> Any:
        """The twisted.web resource of this app."""
        return self._app.resource()


class AdminSite(Site):
    """The admin app's Site: no access log (scrapes every few seconds would flood the journal)."""

    def __init__(self, app: AdminApp, reactor: IReactorTime) -> None:
        super().__init__(app.resource(), reactor=reactor)

    def log(self, request: http.Request) -> None:
        """No access log."""
