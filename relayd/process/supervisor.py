"""The supervisor: N worker processes, one reactor each, sharing the ingest port.

``twistd relayd`` with ``[server] workers = N`` (N > 1, or ``"auto"`` = one
per core) runs this small process instead of the relay itself.  It

* binds the ingest port before anything else (so "address in use" is an
  immediate exit 2 with one line on stderr, as with one process): one
  ``SO_REUSEPORT`` socket per worker slot, so the kernel spreads new
  connections over the workers' own accept queues.  With systemd socket
  activation (``listen = "systemd:domain=INET:index=0"``) the activated
  socket is the only one and all workers accept from it;
* starts the workers (`relayd.process.worker`, fresh interpreters through
  ``reactor.spawnProcess``) and passes each its socket(s) as inherited
  descriptors;
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

Reload (SIGHUP): the config is loaded and fully validated first; a bad one
is rejected with a log line and nothing changes.  Otherwise a new generation
of workers is started on the same sockets; only when all of them are ready
are the old ones sent SIGTERM (they drain as on a stop).  If a new worker
fails before it is ready, the new generation is stopped and the old one
keeps serving.  ``listen`` and ``admin`` changes need a restart (logged);
everything else, including the number of workers, is applied.

The supervisor holds no messages: if it is killed, every worker sees its
stdin close, drains and exits, and spools survive for the next start.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, serverFromString
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import Site
from zope.interface import implementer

from relayd.config import Config, ConfigError
from relayd.listener import ListenerService
from relayd.ops.admin import AdminApp
from relayd.ops.metrics_merge import Family, MetricsMerger
from relayd.process.sdnotify import Notifier, child_environment
from relayd.process.worker import bind_reuseport

#: Backoff before restarting a dead worker: 0.1 s doubling to 10 s, jittered.
RESTART_BACKOFF_MIN = 0.1
RESTART_BACKOFF_MAX = 10.0
#: A worker that ran this long resets its slot's backoff.
RESTART_BACKOFF_RESET = 30.0
#: Seconds a new worker (start or reload) gets to report ready.
WORKER_START_TIMEOUT = 60.0
#: Seconds a scrape of one worker's admin socket may take.
SCRAPE_TIMEOUT = 2.0
#: Grace beyond shutdown_timeout before a draining worker gets SIGKILL.
STOP_GRACE = 15.0
#: Seconds between checks of the workers' heartbeats.
HEARTBEAT_CHECK_INTERVAL = 1.0
#: A worker whose heartbeat (every second) is older than this is killed and restarted.
DEFAULT_WORKER_TIMEOUT = 30.0


def resolve_workers(workers: Any) -> int:
    """``"auto"`` -> the CPUs this process may run on; an int stays."""
    if workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    return int(workers)


def _systemd_fd(description: str) -> tuple:
    """The inherited fd and family of a ``systemd:domain=INET:index=0`` (or ``name=``) endpoint.

    Twisted reads (and removes) ``LISTEN_PID``/``LISTEN_FDS`` when
    `twisted.internet.endpoints` is imported; its parsed view is the source.
    """
    from twisted.internet.endpoints import _parse, _SystemdParser

    _, kwargs = _parse(description)
    listen = _SystemdParser._sddaemon
    fds = listen.inheritedDescriptors()
    if not fds:
        raise ValueError(f"{description}: not socket-activated (no LISTEN_FDS for this pid)")
    if "index" in kwargs:
        index = int(kwargs["index"])
        if not 0 <= index < len(fds):
            raise ValueError(f"{description}: index {index} but {len(fds)} activated socket(s)")
        fd = fds[index]
    elif "name" in kwargs:
        named = listen.inheritedNamedDescriptors()
        if kwargs["name"] not in named:
            raise ValueError(f"{description}: no activated socket named {kwargs['name']!r}")
        fd = named[kwargs["name"]]
    else:
        fd = fds[0]
    family = socket.AF_INET6 if kwargs.get("domain", "INET").upper() == "INET6" else socket.AF_INET
    return fd, family


@attrs.define(eq=False)
class WorkerHandle:
    """One worker process as the supervisor sees it."""

    slot: int
    generation: int
    admin_path: str
    started_at: float
    pid: Optional[int] = None
    transport: Any = None
    ready: bool = False
    last_seen: float = 0.0
    retiring: bool = False
    exit_code: Optional[int] = None
    last_metrics: Optional[str] = None
    ready_waiters: List[Deferred] = attrs.Factory(list)
    exited: Deferred = attrs.Factory(Deferred)

    def signal(self, signum: int) -> None:
        """Send `signum` if the process still runs."""
        if self.transport is not None and self.exit_code is None:
            try:
                self.transport.signalProcess(signum)
            except Exception:  # ProcessExitedAlready and friends
                pass


class WorkerProtocol(ProcessProtocol):
    """Reads a worker's status lines (fd 3) and reports its exit."""

    def __init__(self, supervisor: Supervisor, handle: WorkerHandle) -> None:
        self._supervisor = supervisor
        self._handle = handle
        self._buf = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != 3:
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            self._supervisor._on_status(self._handle, message)

    def processEnded(self, reason: Any) -> None:
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        if isinstance(value, ProcessDone):
            code = 0
        self._supervisor._on_exit(self._handle, code if code is not None else 128 + (sig or 0), sig)


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    """``http://<slot>/path`` -> the worker's admin unix socket."""

    def __init__(self, reactor: Any, paths: Callable[[str], str]) -> None:
        self._reactor = reactor
        self._paths = paths

    def endpointForURI(self, uri: Any) -> Any:
        return UNIXClientEndpoint(self._reactor, self._paths(uri.host.decode()), timeout=SCRAPE_TIMEOUT)


class Supervisor(MultiService):
    """Starts, watches, reloads and stops the worker processes."""

    _log = Logger(namespace="relayd.process.supervisor")

    def __init__(
        self,
        reactor: Any,
        config: Config,
        config_text: str,
        load: Callable[[], Tuple[Config, str]],
        notifier: Optional[Notifier] = None,
        python: str = sys.executable,
        environ: Optional[Dict[str, str]] = None,
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
    ) -> None:
        """`load()` reads and validates the config file again (raises ConfigError) and returns it with its text.

        Each generation of workers reads a snapshot of the text it was
        validated from (relative paths still resolve against the daemon's
        working directory), so a crashed worker is restarted with its own
        generation's config, not with whatever the file says now.
        """
        super().__init__()
        self._reactor = reactor
        self.config = config
        self._load = load
        self._texts: Dict[int, str] = {0: config_text}
        self._notifier = notifier if notifier is not None else Notifier()
        self._python = python
        self._environ = dict(os.environ if environ is None else environ)
        self._worker_timeout = worker_timeout
        self._sockets: List[socket.socket] = []
        self._shared_fd: Optional[int] = None  # systemd-activated socket
        self._family = socket.AF_INET
        self._rundir = ""
        self._owns_rundir = False
        self._exit_status = 0
        self.clean: Optional[bool] = None
        self.generation = 0
        self.current: List[WorkerHandle] = []
        self.handles: Dict[int, WorkerHandle] = {}  # pid -> live handle
        self._failures: Dict[int, int] = {}  # slot -> consecutive quick deaths
        self._restart_calls: Dict[int, Any] = {}
        self._restarts: Dict[int, int] = {}
        self._merger = MetricsMerger()
        self._stopping = False
        self._reloading = False
        self._announced = False
        self._check = LoopingCall(self._check_heartbeats)
        self._check.clock = reactor
        self._agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(reactor, self._admin_path_of))
        admin_site = Site(AdminApp(self, self.readiness).resource(), reactor=reactor)
        admin_site.log = lambda request: None  # type: ignore[method-assign]
        self.admin = ListenerService(serverFromString(reactor, config.server.admin), admin_site, "admin")
        self.admin.setServiceParent(self)

    # -- sockets -------------------------------------------------------------

    def _bind(self, count: int) -> None:
        listen = self.config.server.listen
        if listen.startswith("systemd:"):
            if self._shared_fd is None:
                self._shared_fd, self._family = _systemd_fd(listen)
            return
        while len(self._sockets) < count:
            s = bind_reuseport(listen)
            self._family = s.family
            self._sockets.append(s)

    def _fds_for(self, slot: int, workers: int) -> List[int]:
        if self._shared_fd is not None:
            return [self._shared_fd]
        # Slots beyond the worker count (fewer workers after a reload) stay
        # open and are served by a live worker: closing them would reset
        # their queued connections.
        return [s.fileno() for i, s in enumerate(self._sockets) if i % workers == slot]

    def privilegedStartService(self) -> None:
        """Bind the ingest sockets and the admin port; exit 2 with one line if either fails."""
        try:
            self._bind(resolve_workers(self.config.server.workers))
        except (OSError, ValueError) as e:
            sys.stderr.write(f"relayd: cannot listen for ingest: {e}\n")
            sys.stderr.flush()
            raise SystemExit(2) from None
        self._rundir = self._environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or tempfile.mkdtemp(prefix="relayd-")
        self._owns_rundir = not self._environ.get("RUNTIME_DIRECTORY")
        super().privilegedStartService()

    # -- workers -------------------------------------------------------------

    def _admin_path_of(self, key: str) -> str:
        return os.path.join(self._rundir, f"{key}.sock")

    def _write_snapshot(self, generation: int) -> str:
        path = os.path.join(self._rundir, f"config-g{generation}.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(self._texts[generation])
        return path

    def _spawn(self, slot: int, generation: int, workers: int, config_path: str) -> WorkerHandle:
        key = f"w{slot}-g{generation}-{len(self._restarts) + sum(self._restarts.values())}"
        admin_path = self._admin_path_of(key)
        handle = WorkerHandle(
            slot=slot, generation=generation, admin_path=admin_path, started_at=self._reactor.seconds()
        )
        handle.last_seen = handle.started_at
        fds = self._fds_for(slot, workers)
        child_fds: Dict[int, Any] = {0: "w", 1: 1, 2: 2, 3: "r"}
        argv = [
            self._python,
            "-m",
            "relayd.process.worker",
            "--config",
            config_path,
            "--index",
            str(slot),
            "--generation",
            str(generation),
            "--admin",
            f"unix:{admin_path}:mode=600",
            "--status-fd",
            "3",
            "--watch-parent",
            "--family",
            "INET6" if self._family == socket.AF_INET6 else "INET",
        ]
        for k, fd in enumerate(fds):
            child_fds[4 + k] = fd
            argv += ["--listen-fd", str(4 + k)]
        env = child_environment(self._environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proto = WorkerProtocol(self, handle)
        handle.transport = self._reactor.spawnProcess(
            proto, self._python, argv, env=env, path=os.getcwd(), childFDs=child_fds
        )
        handle.pid = handle.transport.pid
        self.handles[handle.pid] = handle
        self._log.info(
            "started worker {slot} (generation {generation}) as pid {pid}",
            slot=slot,
            generation=generation,
            pid=handle.pid,
        )
        return handle

    def _wait_ready(self, handle: WorkerHandle) -> Deferred:
        d: Deferred = Deferred()
        if handle.ready:
            d.callback(handle)
        elif handle.exit_code is not None:
            d.errback(RuntimeError(f"worker {handle.slot} exited with {handle.exit_code} before it was ready"))
        else:
            handle.ready_waiters.append(d)
        return d

    def _on_status(self, handle: WorkerHandle, message: Dict[str, Any]) -> None:
        handle.last_seen = self._reactor.seconds()
        if "final_metrics" in message:
            handle.last_metrics = message["final_metrics"]
        if message.get("ready") and not handle.ready:
            handle.ready = True
            self._log.info("worker {slot} (pid {pid}) is ready", slot=handle.slot, pid=handle.pid)
            waiters, handle.ready_waiters = handle.ready_waiters, []
            for d in waiters:
                d.callback(handle)
            self._maybe_announce()

    def _on_exit(self, handle: WorkerHandle, code: int, sig: Optional[int]) -> None:
        handle.exit_code = code
        self.handles.pop(handle.pid or -1, None)
        self._merger.retire(handle.last_metrics)
        handle.last_metrics = None
        with_suffix = f" (signal {sig})" if sig else ""
        if handle.retiring or self._stopping:
            log = self._log.info if code == 0 else self._log.error
            log(
                "worker {slot} (pid {pid}) stopped with status {code}{how}",
                slot=handle.slot,
                pid=handle.pid,
                code=code,
                how=with_suffix,
            )
        else:
            self._log.error(
                "worker {slot} (pid {pid}) died with status {code}{how}",
                slot=handle.slot,
                pid=handle.pid,
                code=code,
                how=with_suffix,
            )
        waiters, handle.ready_waiters = handle.ready_waiters, []
        for d in waiters:
            d.errback(RuntimeError(f"worker {handle.slot} exited with {code} before it was ready"))
        for path in (handle.admin_path,):
            try:
                os.unlink(path)
            except OSError:
                pass
        handle.exited.callback(code)
        if handle in self.current and not self._stopping:
            self._schedule_restart(handle)

    def _schedule_restart(self, dead: WorkerHandle) -> None:
        slot = dead.slot
        if self._reactor.seconds() - dead.started_at > RESTART_BACKOFF_RESET:
            self._failures[slot] = 0
        n = self._failures.get(slot, 0)
        self._failures[slot] = n + 1
        delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN * 2**n) * random.uniform(0.5, 1.0)
        self._log.info("restarting worker {slot} in {delay:.2f}s", slot=slot, delay=delay)

        def restart() -> None:
            self._restart_calls.pop(slot, None)
            if self._stopping or dead not in self.current:
                return
            self._restarts[slot] = self._restarts.get(slot, 0) + 1
            config_path = os.path.join(self._rundir, f"config-g{dead.generation}.toml")
            new = self._spawn(slot, dead.generation, len(self.current), config_path)
            self.current[self.current.index(dead)] = new

        self._restart_calls[slot] = self._reactor.callLater(delay, restart)

    def _check_heartbeats(self) -> None:
        now = self._reactor.seconds()
        for handle in list(self.handles.values()):
            if handle.retiring or handle.exit_code is not None:
                continue
            if now - handle.last_seen > self._worker_timeout:
                self._log.error(
                    "worker {slot} (pid {pid}) silent for {t:.0f}s (blocked reactor?); killing it",
                    slot=handle.slot,
                    pid=handle.pid,
                    t=now - handle.last_seen,
                )
                handle.last_seen = now  # one kill per timeout
                handle.signal(signal.SIGKILL)

    def _healthy(self) -> bool:
        now = self._reactor.seconds()
        return all(now - h.last_seen <= self._worker_timeout for h in self.current if h.exit_code is None)

    def _maybe_announce(self) -> None:
        if self._announced or self._stopping:
            return
        if self.current and all(h.ready for h in self.current):
            self._announced = True
            pids = ", ".join(str(h.pid) for h in self.current)
            self._log.info("relayd ready: {count} workers listening (pids {pids})", count=len(self.current), pids=pids)
            self._notifier.ready(f"{len(self.current)} workers ready")
            self._notifier.start_watchdog(self._reactor, self._healthy)

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        """Start generation 0; SIGHUP reloads."""
        super().startService()
        workers = resolve_workers(self.config.server.workers)
        config_path = self._write_snapshot(0)
        self.current = [self._spawn(slot, 0, workers, config_path) for slot in range(workers)]
        self._check.start(HEARTBEAT_CHECK_INTERVAL, now=False)
        first = DeferredList([self._wait_ready(h) for h in self.current], fireOnOneErrback=True, consumeErrors=True)
        first.addErrback(self._start_failed)

    def _start_failed(self, failure: Any) -> None:
        if self._stopping:
            return
        error = failure.value.subFailure.value if hasattr(failure.value, "subFailure") else failure.value
        sys.stderr.write(f"relayd: a worker failed to start: {error}\n")
        sys.stderr.flush()
        self._log.error("a worker failed to start: {error}; stopping", error=error)
        self._exit_status = 2
        self._reactor.stop()

    def install_sighup(self) -> None:
        """SIGHUP -> `reload` on the reactor thread."""

        def on_sighup(signum: int, frame: Any) -> None:
            self._reactor.callFromThread(self.reload)

        signal.signal(signal.SIGHUP, on_sighup)

    def reload(self) -> Deferred:
        """Start a new generation from the (validated) config file; retire the old one when it is ready."""
        if self._stopping:
            return succeed(False)
        if self._reloading:
            self._log.warn("SIGHUP: a reload is already in progress; ignored")
            return succeed(False)
        try:
            new, text = self._load()
        except ConfigError as e:
            self._log.error("SIGHUP: config rejected, old workers keep serving: {error}", error=str(e))
            return succeed(False)
        if new.server.listen != self.config.server.listen or new.server.admin != self.config.server.admin:
            self._log.warn("SIGHUP: [server] listen/admin changes need a restart; keeping the old ones")
            new = attrs.evolve(
                new, server=attrs.evolve(new.server, listen=self.config.server.listen, admin=self.config.server.admin)
            )
        workers = resolve_workers(new.server.workers)
        try:
            self._bind(workers)
        except (OSError, ValueError) as e:
            self._log.error(
                "SIGHUP: cannot bind for {n} workers ({error}); old workers keep serving", n=workers, error=e
            )
            return succeed(False)
        self._reloading = True
        self._notifier.reloading(int(time.monotonic() * 1e6))
        self.generation += 1
        generation = self.generation
        self._texts[generation] = text
        config_path = self._write_snapshot(generation)
        self._log.info("SIGHUP: starting generation {g} ({n} workers)", g=generation, n=workers)
        fresh = [self._spawn(slot, generation, workers, config_path) for slot in range(workers)]
        waits: List[Deferred] = []
        def give_up() -> None:
            for d in waits:
                if not d.called:
                    d.cancel()

        timeout = self._reactor.callLater(WORKER_START_TIMEOUT, give_up)
        waits.extend(self._wait_ready(h) for h in fresh)
        done = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)

        def succeeded(_: object) -> bool:
            old, self.current = self.current, fresh
            self.config = new
            for slot in list(self._restart_calls):
                call = self._restart_calls.pop(slot)
                if call.active():
                    call.cancel()
            self._failures.clear()
            for handle in old:
                handle.retiring = True
                handle.signal(signal.SIGTERM)
            self._log.info("SIGHUP: generation {g} serving; {n} old workers draining", g=generation, n=len(old))
            self._notifier.ready(f"{len(fresh)} workers ready (generation {generation})")
            return True

        def failed(failure: Any) -> bool:
            error = failure.value.subFailure.value if hasattr(failure.value, "subFailure") else failure.value
            self._log.error("SIGHUP: new workers failed ({error}); old workers keep serving", error=str(error))
            for handle in fresh:
                handle.retiring = True
                handle.signal(signal.SIGTERM)
            self._notifier.ready("reload failed; previous workers serving")
            return False

        def finish(result: Any) -> Any:
            self._reloading = False
            if timeout.active():
                timeout.cancel()
            return result

        return done.addCallbacks(succeeded, failed).addBoth(finish)

    def stopService(self) -> Deferred:
        """Drain every worker; fires when all exited (clean = all exited 0)."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        self._notifier.stopping()
        self._notifier.stop_watchdog()
        if self._check.running:
            self._check.stop()
        for call in self._restart_calls.values():
            if call.active():
                call.cancel()
        self._restart_calls.clear()
        await MultiService.stopService(self)  # the admin listener
        # Our copies of the listening sockets go first: when the last worker
        # closes its copy, the port is closed and new clients are refused
        # at once instead of waiting in a queue nobody accepts from.
        for s in self._sockets:
            s.close()
        self._sockets = []
        handles = list(self.handles.values())
        for handle in handles:
            handle.retiring = True
            handle.signal(signal.SIGTERM)
        kill_after = self.config.server.shutdown_timeout + STOP_GRACE

        def kill() -> None:
            for handle in handles:
                if handle.exit_code is None:
                    self._log.error(
                        "worker {slot} (pid {pid}) still draining; SIGKILL", slot=handle.slot, pid=handle.pid
                    )
                    handle.signal(signal.SIGKILL)

        killer = self._reactor.callLater(kill_after, kill)
        codes = [await h.exited for h in handles]
        if killer.active():
            killer.cancel()
        self.clean = all(c == 0 for c in codes) and self._exit_status == 0
        if self.clean:
            self._reactor._exitSignal = None  # see RelayService: exit 0 after a lossless stop
        if self._owns_rundir and self._rundir:
            shutil.rmtree(self._rundir, ignore_errors=True)
        self._log.info("relayd supervisor stopped (clean={clean})", clean=self.clean)
        if self._exit_status:
            self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, self._exit_status)

    # -- admin -------------------------------------------------------------------

    def _get(self, handle: WorkerHandle, path: str) -> Deferred:
        key = os.path.basename(handle.admin_path)[: -len(".sock")]
        d = self._agent.request(b"GET", f"http://{key}{path}".encode())
        call = self._reactor.callLater(SCRAPE_TIMEOUT, d.cancel)

        def body(response: Any) -> Deferred:
            return readBody(response).addCallback(lambda data: (response.code, data))

        def done(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        return d.addCallback(body).addBoth(done)

    def readiness(self) -> Deferred:
        """Checks: every current worker listens, and each answers its own /readyz 200."""
        current = list(self.current)
        checks: Dict[str, bool] = {
            "workers_listening": bool(current) and all(h.ready and h.exit_code is None for h in current)
        }

        def one(handle: WorkerHandle) -> Deferred:
            def record(result: Any) -> None:
                checks[f"worker_{handle.slot}"] = result[0] == 200

            def failed(_: Any) -> None:
                checks[f"worker_{handle.slot}"] = False

            return self._get(handle, "/readyz").addCallbacks(record, failed)

        ds = [one(h) for h in current if h.ready and h.exit_code is None]
        return DeferredList(ds).addCallback(lambda _: checks)

    def exposition(self) -> Deferred:
        """Merged /metrics of every live worker, plus per-worker series."""
        live = [h for h in self.handles.values() if h.ready and h.exit_code is None]

        def scrape(handle: WorkerHandle) -> Deferred:
            def keep(result: Any) -> Optional[str]:
                if result[0] != 200:
                    return handle.last_metrics
                handle.last_metrics = result[1].decode("utf-8")
                return handle.last_metrics

            return self._get(handle, "/metrics").addCallbacks(keep, lambda _: handle.last_metrics)

        def merge(results: List[Any]) -> bytes:
            texts = [text for ok, text in results if ok and text]
            return self._merger.merge(texts, self._own_families(live))

        return DeferredList([scrape(h) for h in live]).addCallback(merge)

    def _own_families(self, live: Sequence[WorkerHandle]) -> List[Family]:
        workers = Family("relayd_workers", "gauge", "Worker processes configured.")
        workers.add("relayd_workers", {}, float(len(self.current)))
        up = Family("relayd_worker_up", "gauge", "1 while the worker of a slot runs and is ready.")
        info = Family("relayd_worker_info", "gauge", "Pid and generation of each live worker.")
        ingested = Family("relayd_worker_messages", "counter", "Messages accepted, per live worker (since it started).")
        restarts = Family("relayd_worker_restarts", "counter", "Worker restarts after a crash, per slot.")
        for handle in self.current:
            slot = str(handle.slot)
            up.add("relayd_worker_up", {"worker": slot}, 1.0 if handle.ready and handle.exit_code is None else 0.0)
            restarts.add("relayd_worker_restarts_total", {"worker": slot}, float(self._restarts.get(handle.slot, 0)))
        for handle in live:
            labels = {"worker": str(handle.slot), "pid": str(handle.pid), "generation": str(handle.generation)}
            info.add("relayd_worker_info", labels, 1.0)
            total = 0.0
            if handle.last_metrics:
                from relayd.ops.metrics_merge import parse

                for name, _kind, _doc, samples in parse(handle.last_metrics):
                    if name == "relayd_ingested":
                        total += sum(v for n, _, v in samples if n.endswith("_total"))
            ingested.add("relayd_worker_messages_total", labels, total)
        return [workers, up, info, ingested, restarts]


def make_supervisor(reactor: Any, config: Config, load: Callable[[], Tuple[Config, str]]) -> Supervisor:
    """The service ``twistd relayd`` runs when ``[server] workers`` > 1 (SIGHUP reloads)."""
    try:
        _, text = load()
    except ConfigError as e:
        sys.stderr.write(f"relayd: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    supervisor = Supervisor(reactor, config, text, load)
    supervisor.install_sighup()
    return supervisor
