# -*- test-case-name: tests.test_workers,tests.test_sdnotify -*-
"""The supervisor: N worker processes, one reactor each, sharing the ingest port.

``twistd relayd`` with ``[server] workers = N`` (N > 1, or ``"auto"`` = one
per core) runs this small process instead of the relay itself.  It

* binds the ingest port before anything else (so "address in use" is an
  immediate exit 2 with one line on stderr, as with one process): one
  ``SO_REUSEPORT`` socket per worker slot, so the kernel spreads new
  connections over the workers' own accept queues.  With systemd socket
  activation (``listen = "systemd:domain=INET:index=0"``) the activated
  socket is the only one and all workers accept from it;
* starts the workers (``python -m relayd.process.worker``, fresh
  interpreters through ``reactor.spawnProcess``; it never imports that
  module) and passes each its socket(s) as inherited descriptors;
* restarts a worker that dies (jittered exponential backoff) or whose
  heartbeat stops for `[server] worker_timeout`; the dead worker's spool
  directory is recovered by its successor or adopted by another worker
  (relayd/outbox/adoption.py);
* serves the one admin endpoint: ``/metrics`` merged from every worker's
  private admin socket (relayd/ops/metrics_merge.py), ``/readyz`` (every worker
  listens, recovered its spool and can store), ``/healthz``;
* tells systemd ``READY=1`` once every worker is ready, and pings the
  watchdog from its reactor while every worker's heartbeat is fresh;
* SIGTERM: every worker drains (lossless) and the supervisor exits 0 when
  all of them did; SIGHUP: reload (below).

Why the supervisor binds the workers' sockets instead of each worker
binding its own: a ``SO_REUSEPORT`` listening socket that closes resets
every connection still in its accept queue, so a reload where old workers
close their own sockets refuses clients (nginx's well-known reuseport
reload problem; Linux >= 5.14 can migrate them with
``net.ipv4.tcp_migrate_req``, which is off by default).  Here a socket lives
as long as the supervisor: on reload the new worker of a slot adopts the
same socket before the old one stops accepting, and the old one only closes
its descriptor (never ``shutdown()``, which would stop the socket for every
holder), so nothing is ever refused or reset.

Reload (SIGHUP) starts a new generation of workers on the same sockets and
retires the old one once the new one is ready (relayd/process/generations.py).

The supervisor holds no messages: if it is killed, every worker sees its
stdin close, drains and exits, and spools survive for the next start.

This class only composes the parts, each in its own module, and owns the
order of start and stop; the parts never call it except through the two
callbacks the pool was given:

=========================  ===================================================
relayd/process/sockets.py  the ingest sockets (bound once, inherited by all)
relayd/process/rundir.py   the run directory (admin sockets, config snapshots)
relayd/process/pool.py     worker processes, status pipe, restarts (backoff.py)
relayd/process/heartbeats  SIGKILL for a worker whose heartbeat stopped
relayd/process/generations reload: the next generation, then retire the old
relayd/process/aggregate   /metrics and /readyz from the workers' admin sockets
relayd/process/sdnotify    READY=1 / RELOADING=1 / STOPPING=1 and the watchdog
=========================  ===================================================
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Callable, Mapping, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.compat import exit_status_zero
from relayd.config import Config, LoadedConfig, resolve_workers
from relayd.listener import ListenerService
from relayd.ops.admin import AdminApp, AdminSite
from relayd.process.aggregate import WorkerAdmin
from relayd.process.deliver_view import WorkersDeliverView
from relayd.process.generations import Generations, first_error
from relayd.process.heartbeats import DEFAULT_WORKER_TIMEOUT, HeartbeatMonitor
from relayd.process.pool import WorkerHandle, WorkerPool
from relayd.process.rundir import RunDir
from relayd.process.sdnotify import Notifier, SupervisorNotify
from relayd.process.sockets import IngestSockets

#: Grace beyond shutdown_timeout before a draining worker gets SIGKILL.
STOP_GRACE = 15.0


class Supervisor(MultiService):
    """Starts, watches, reloads and stops the worker processes (by composing the parts above)."""

    _log = Logger(namespace="relayd.process.supervisor")

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        config_text: str,
        load: Callable[[], LoadedConfig],
        notifier: Optional[Notifier] = None,
        python: str = sys.executable,
        environ: Optional[Mapping[str, str]] = None,
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
    ) -> None:
        """`load()` reads and validates the config file again (raises ConfigError); used on SIGHUP."""
        super().__init__()
        self._reactor = reactor
        self._core = IReactorCore(reactor)
        env = dict(os.environ if environ is None else environ)
        self._rundir = RunDir(env)
        self._sockets = IngestSockets(config.server.listen)
        self._exit_status = 0
        self.clean: Optional[bool] = None
        self.pool = WorkerPool(reactor, self._sockets, self._rundir, self._worker_ready, self._worker_exited, python, env)
        self._heartbeats = HeartbeatMonitor(reactor, self.pool, worker_timeout)
        self._notify = SupervisorNotify(
            reactor, notifier if notifier is not None else Notifier(), self._heartbeats.healthy
        )
        self.generations = Generations(
            reactor, self.pool, self._sockets, self._rundir, self._notify, load, config, config_text
        )
        self._admin = WorkerAdmin(reactor, self.pool, self._rundir)
        admin_site = AdminSite(
            AdminApp(self._admin, self._admin.readiness, deliver=WorkersDeliverView(self._admin, self.pool)), reactor
        )
        self.admin = ListenerService(serverFromString(reactor, config.server.admin), admin_site, "admin")
        self.admin.setServiceParent(self)

    @property
    def config(self) -> Config:
        """The config of the serving generation."""
        return self.generations.config

    # -- what the pool tells us ------------------------------------------------------

    def _worker_ready(self, handle: WorkerHandle) -> None:
        current = self.pool.current
        if not self.pool.stopping and current and all(h.ready for h in current):
            self._notify.workers_ready([h.pid for h in current])

    def _worker_exited(self, handle: WorkerHandle) -> None:
        self._admin.retire(handle)

    # -- lifecycle ---------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind the ingest sockets and the admin port; exit 2 with one line if either fails."""
        try:
            self._sockets.bind(resolve_workers(self.config.server.workers))
        except (OSError, ValueError) as e:
            sys.stderr.write(f"relayd: cannot listen for ingest: {e}\n")
            sys.stderr.flush()
            raise SystemExit(2) from None
        self._rundir.create()
        super().privilegedStartService()

    def startService(self) -> None:
        """Start generation 0 and the heartbeat checks; SIGHUP reloads."""
        super().startService()
        first = self.generations.start()
        self._heartbeats.start()
        first.addErrback(self._start_failed)

    def _start_failed(self, failure: Failure) -> None:
        if self.pool.stopping:
            return
        error = first_error(failure)
        sys.stderr.write(f"relayd: a worker failed to start: {error}\n")
        sys.stderr.flush()
        self._log.error("a worker failed to start: {error}; stopping", error=error)
        self._exit_status = 2
        self._core.stop()

    def install_sighup(self) -> None:
        """SIGHUP -> `reload` on the reactor thread."""

        threads = IReactorFromThreads(self._reactor)

        def on_sighup(signum: int, frame: Optional[FrameType]) -> None:
            threads.callFromThread(self.reload)

        signal.signal(signal.SIGHUP, on_sighup)

    def reload(self) -> Deferred[bool]:
        """Start a new generation from the (validated) config file; retire the old one when it is ready."""
        return self.generations.reload()

    def stopService(self) -> Deferred[None]:
        """Drain every worker; fires when all exited (clean = all exited 0)."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.pool.stopping = True
        self._notify.stopping()
        self._heartbeats.stop()
        self.pool.cancel_restarts()
        await MultiService.stopService(self)  # the admin listener
        # Our copies of the listening sockets go first: when the last worker
        # closes its copy, the port is closed and new clients are refused
        # at once instead of waiting in a queue nobody accepts from.
        self._sockets.close()
        codes = await self.pool.stop(self.config.server.shutdown_timeout + STOP_GRACE)
        self.clean = all(c == 0 for c in codes) and self._exit_status == 0
        if self.clean:
            exit_status_zero(self._core)  # see RelayService: exit 0 after a lossless stop
        self._rundir.remove()
        self._log.info("relayd supervisor stopped (clean={clean})", clean=self.clean)
        if self._exit_status:
            self._core.addSystemEventTrigger("after", "shutdown", os._exit, self._exit_status)


def make_supervisor(reactor: IReactorTime, loaded: LoadedConfig, load: Callable[[], LoadedConfig]) -> Supervisor:
    """The service ``twistd relayd`` runs when ``[server] workers`` > 1 (SIGHUP reloads)."""
    supervisor = Supervisor(reactor, loaded.config, loaded.text, load)
    supervisor.install_sighup()
    return supervisor
