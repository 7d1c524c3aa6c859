# -*- test-case-name: tests.test_workers -*-
"""The supervisor's admin answers, aggregated from the workers' private admin sockets.

Each worker serves ``/metrics`` and ``/readyz`` on a unix socket in the
run directory; the supervisor's one admin port answers for all of them:
``/metrics`` is every live worker's exposition merged
(relayd/ops/metrics_merge.py) plus per-worker series, ``/readyz`` is ready
when every worker of the serving generation listens and answers its own
``/readyz`` 200.  A worker that does not answer within `SCRAPE_TIMEOUT`
counts with its last scrape (metrics) or as not ready (readiness).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, TypeVar

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime, IReactorUNIX, IStreamClientEndpoint
from twisted.web.client import URI, Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from relayd.ops.metrics_merge import Family, MetricsMerger, parse
from relayd.process.pool import WorkerHandle, WorkerPool
from relayd.process.rundir import RunDir

_T = TypeVar("_T")

#: Seconds a scrape of one worker's admin socket may take.
SCRAPE_TIMEOUT = 2.0


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    """``http://<worker key>/path`` -> that worker's admin unix socket."""

    def __init__(self, reactor: IReactorUNIX, rundir: RunDir) -> None:
        self._reactor = reactor
        self._rundir = rundir

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """The unix socket of the worker named by the URI's host."""
        return UNIXClientEndpoint(self._reactor, self._rundir.admin_socket(uri.host.decode()), timeout=SCRAPE_TIMEOUT)


class WorkerAdmin:
    """Scrapes the workers' admin sockets: merged metrics and overall readiness."""

    def __init__(self, reactor: IReactorTime, pool: WorkerPool, rundir: RunDir) -> None:
        self._clock = reactor
        self._pool = pool
        self._merger = MetricsMerger()
        self._agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(IReactorUNIX(reactor), rundir))

    def retire(self, handle: WorkerHandle) -> None:
        """`handle` exited: keep its last counters in the merged totals."""
        self._merger.retire(handle.last_metrics)

    def get(self, handle: WorkerHandle, path: str, method: bytes = b"GET") -> Deferred[Tuple[int, bytes]]:
        """``(status, body)`` of one request to a worker's private admin socket (bounded in time)."""
        key = os.path.basename(handle.admin_path)[: -len(".sock")]
        d = self._agent.request(method, f"http://{key}{path}".encode())
        call = self._clock.callLater(SCRAPE_TIMEOUT, d.cancel)

        def body(response: IResponse) -> Deferred[Tuple[int, bytes]]:
            return readBody(response).addCallback(lambda data: (response.code, data))

        def done(result: _T) -> _T:
            if call.active():
                call.cancel()
            return result

        scraped: Deferred[Tuple[int, bytes]] = d.addCallback(body)
        return scraped.addBoth(done)

    def readiness(self) -> Deferred[Dict[str, bool]]:
        """Checks: every current worker listens, and each answers its own /readyz 200."""
        current = list(self._pool.current)
        checks: Dict[str, bool] = {"workers_listening": bool(current) and all(h.live for h in current)}

        def one(handle: WorkerHandle) -> Deferred[None]:
            def record(result: Tuple[int, bytes]) -> None:
                checks[f"worker_{handle.slot}"] = result[0] == 200

            def failed(_: object) -> None:
                checks[f"worker_{handle.slot}"] = False

            return self.get(handle, "/readyz").addCallbacks(record, failed)

        ds = [one(h) for h in current if h.live]
        return DeferredList(ds).addCallback(lambda _: checks)

    def exposition(self) -> Deferred[bytes]:
        """Merged /metrics of every live worker, plus per-worker series."""
        live = [h for h in self._pool.handles.values() if h.live]

        def scrape(handle: WorkerHandle) -> Deferred[Optional[str]]:
            def keep(result: Tuple[int, bytes]) -> Optional[str]:
                if result[0] != 200:
                    return handle.last_metrics
                handle.last_metrics = result[1].decode("utf-8")
                return handle.last_metrics

            return self.get(handle, "/metrics").addCallbacks(keep, lambda _: handle.last_metrics)

        def merge(results: List[Tuple[bool, Optional[str]]]) -> bytes:
            texts = [text for ok, text in results if ok and text]
            return self._merger.merge(texts, self._own_families(live))

        return DeferredList([scrape(h) for h in live]).addCallback(merge)

    def _own_families(self, live: Sequence[WorkerHandle]) -> List[Family]:
        current = self._pool.current
        workers = Family("relayd_workers", "gauge", "Worker processes configured.")
        workers.add("relayd_workers", {}, float(len(current)))
        up = Family("relayd_worker_up", "gauge", "1 while the worker of a slot runs and is ready.")
        info = Family("relayd_worker_info", "gauge", "Pid and generation of each live worker.")
        ingested = Family("relayd_worker_messages", "counter", "Messages accepted, per live worker (since it started).")
        restarts = Family("relayd_worker_restarts", "counter", "Worker restarts after a crash, per slot.")
        for handle in current:
            slot = str(handle.slot)
            up.add("relayd_worker_up", {"worker": slot}, 1.0 if handle.live else 0.0)
            restarts.add("relayd_worker_restarts_total", {"worker": slot}, float(self._pool.restarts.get(handle.slot, 0)))
        for handle in live:
            labels = {"worker": str(handle.slot), "pid": str(handle.pid), "generation": str(handle.generation)}
            info.add("relayd_worker_info", labels, 1.0)
            total = 0.0
            if handle.last_metrics:
                for name, _kind, _doc, samples in parse(handle.last_metrics):
                    if name == "relayd_ingested":
                        total += sum(v for n, _, v in samples if n.endswith("_total"))
            ingested.add("relayd_worker_messages_total", labels, total)
        return [workers, up, info, ingested, restarts]
