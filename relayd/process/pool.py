# -*- test-case-name: tests.test_workers -*-
"""The worker processes: starting them, watching them exit, restarting the dead.

`WorkerPool` owns every live worker process (`WorkerHandle`): it builds the
command line (``python -m relayd.process.worker`` with the inherited
sockets, the status pipe and a private admin socket), reads the status pipe
(relayd/process/status.py), and restarts a worker of the serving generation
that dies, after the `RestartPolicy` backoff.  Which generation serves is
decided above it (relayd/process/generations.py); the pool reports to its
owner only through the two callbacks it was given (`on_ready`, `on_exit`).
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Callable, Dict, List, Mapping, Optional, Union

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.process.backoff import RestartPolicy
from relayd.process.rundir import RunDir
from relayd.process.sdnotify import child_environment
from relayd.process.sockets import IngestSockets
from relayd.process.status import STATUS_FD, FinalMetrics, Ready, StatusMessage, StatusReader

#: The package root, put on the workers' PYTHONPATH so ``-m relayd.process.worker`` finds this relayd.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The first inherited listening socket's descriptor in a worker (after stdio and the status pipe).
FIRST_LISTEN_FD = STATUS_FD + 1


@attrs.define(eq=False)
class WorkerHandle:
    """One worker process as the supervisor sees it."""

    slot: int
    generation: int
    config_path: str
    admin_path: str
    started_at: float
    pid: Optional[int] = None
    transport: Optional[IProcessTransport] = None
    ready: bool = False
    last_seen: float = 0.0
    retiring: bool = False
    exit_code: Optional[int] = None
    last_metrics: Optional[str] = None
    ready_waiters: List[Deferred[WorkerHandle]] = attrs.Factory(list)
    exited: Deferred[int] = attrs.Factory(Deferred)

    @property
    def live(self) -> bool:
        """Ready and not exited: it serves, and its admin socket answers."""
        return self.ready and self.exit_code is None

    def signal(self, signum: int) -> None:
        """Send `signum` if the process still runs."""
        if self.transport is not None and self.exit_code is None:
            try:
                self.transport.signalProcess(signum)
            except Exception:  # ProcessExitedAlready and friends
                pass

    def retire(self) -> None:
        """Ask it to drain and exit (SIGTERM); it will not be restarted."""
        self.retiring = True
        self.signal(signal.SIGTERM)


class WorkerProtocol(ProcessProtocol):
    """Reads a worker's status pipe and reports its exit to the pool."""

    def __init__(self, pool: WorkerPool, handle: WorkerHandle) -> None:
        self._pool = pool
        self._handle = handle
        self._reader = StatusReader()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """Status lines arrive on `STATUS_FD`; stdout/stderr are inherited, not piped."""
        if childFD != STATUS_FD:
            return
        for message in self._reader.feed(data):
            self._pool.status_received(self._handle, message)

    def processEnded(self, reason: Failure) -> None:
        """Exit status, or 128 + the signal that killed it (as a shell reports it)."""
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        if isinstance(value, ProcessDone):
            code = 0
        self._pool.exited(self._handle, code if code is not None else 128 + (sig or 0), sig)


class WorkerPool:
    """Every live worker process, and the slots of the serving generation (`current`)."""

    _log = Logger(namespace="relayd.process.supervisor")

    def __init__(
        self,
        reactor: IReactorTime,
        sockets: IngestSockets,
        rundir: RunDir,
        on_ready: Callable[[WorkerHandle], None],
        on_exit: Callable[[WorkerHandle], None],
        python: str,
        environ: Mapping[str, str],
        policy: Optional[RestartPolicy] = None,
    ) -> None:
        self._clock = reactor
        self._spawner = IReactorProcess(reactor)
        self._sockets = sockets
        self._rundir = rundir
        self._on_ready = on_ready
        self._on_exit = on_exit
        self._python = python
        self._environ = dict(environ)
        self._policy = policy if policy is not None else RestartPolicy()
        self.current: List[WorkerHandle] = []
        self.handles: Dict[int, WorkerHandle] = {}  # pid -> live handle
        self.restarts: Dict[int, int] = {}  # slot -> restarts after a crash
        self._restart_calls: Dict[int, IDelayedCall] = {}
        self.stopping = False

    # -- starting ---------------------------------------------------------------

    def spawn(self, slot: int, generation: int, workers: int, config_path: str) -> WorkerHandle:
        """Start worker `slot` of `workers` for `generation`, reading `config_path`."""
        key = f"w{slot}-g{generation}-{len(self.restarts) + sum(self.restarts.values())}"
        handle = WorkerHandle(
            slot=slot,
            generation=generation,
            config_path=config_path,
            admin_path=self._rundir.admin_socket(key),
            started_at=self._clock.seconds(),
        )
        handle.last_seen = handle.started_at
        child_fds: Dict[int, Union[int, str]] = {0: "w", 1: 1, 2: 2, STATUS_FD: "r"}
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
            f"unix:{handle.admin_path}:mode=600",
            "--status-fd",
            str(STATUS_FD),
            "--watch-parent",
            "--family",
            "INET6" if self._sockets.family == socket.AF_INET6 else "INET",
        ]
        for k, fd in enumerate(self._sockets.fds_for(slot, workers)):
            child_fds[FIRST_LISTEN_FD + k] = fd
            argv += ["--listen-fd", str(FIRST_LISTEN_FD + k)]
        env = child_environment(self._environ)
        env["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        handle.transport = self._spawner.spawnProcess(
            WorkerProtocol(self, handle), self._python, argv, env=env, path=os.getcwd(), childFDs=child_fds
        )
        handle.pid = handle.transport.pid
        assert handle.pid is not None
        self.handles[handle.pid] = handle
        self._log.info(
            "started worker {slot} (generation {generation}) as pid {pid}",
            slot=slot,
            generation=generation,
            pid=handle.pid,
        )
        return handle

    def wait_ready(self, handle: WorkerHandle) -> Deferred[WorkerHandle]:
        """Fires with `handle` once it reported ready; fails if it exits first."""
        d: Deferred[WorkerHandle] = Deferred()
        if handle.ready:
            d.callback(handle)
        elif handle.exit_code is not None:
            d.errback(RuntimeError(f"worker {handle.slot} exited with {handle.exit_code} before it was ready"))
        else:
            handle.ready_waiters.append(d)
        return d

    # -- what the workers tell us -------------------------------------------------

    def status_received(self, handle: WorkerHandle, message: StatusMessage) -> None:
        """Any message is a sign of life; `Ready` and `FinalMetrics` also carry news."""
        handle.last_seen = self._clock.seconds()
        if isinstance(message, FinalMetrics):
            handle.last_metrics = message.text
        elif isinstance(message, Ready) and not handle.ready:
            handle.ready = True
            self._log.info("worker {slot} (pid {pid}) is ready", slot=handle.slot, pid=handle.pid)
            waiters, handle.ready_waiters = handle.ready_waiters, []
            for d in waiters:
                d.callback(handle)
            self._on_ready(handle)

    def exited(self, handle: WorkerHandle, code: int, sig: Optional[int]) -> None:
        """A worker process ended: log it, fail its waiters, restart it if it still had a slot."""
        handle.exit_code = code
        self.handles.pop(handle.pid or -1, None)
        self._on_exit(handle)
        handle.last_metrics = None
        with_suffix = f" (signal {sig})" if sig else ""
        if handle.retiring or self.stopping:
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
        try:
            os.unlink(handle.admin_path)
        except OSError:
            pass
        handle.exited.callback(code)
        if handle in self.current and not self.stopping:
            self._schedule_restart(handle)

    # -- restarts ---------------------------------------------------------------

    def _schedule_restart(self, dead: WorkerHandle) -> None:
        slot = dead.slot
        delay = self._policy.delay(slot, self._clock.seconds() - dead.started_at)
        self._log.info("restarting worker {slot} in {delay:.2f}s", slot=slot, delay=delay)

        def restart() -> None:
            self._restart_calls.pop(slot, None)
            if self.stopping or dead not in self.current:
                return
            self.restarts[slot] = self.restarts.get(slot, 0) + 1
            new = self.spawn(slot, dead.generation, len(self.current), dead.config_path)
            self.current[self.current.index(dead)] = new

        self._restart_calls[slot] = self._clock.callLater(delay, restart)

    def cancel_restarts(self) -> None:
        """Drop pending restarts (a new generation took the slots, or we stop)."""
        for call in self._restart_calls.values():
            if call.active():
                call.cancel()
        self._restart_calls.clear()

    def serve(self, fresh: List[WorkerHandle]) -> List[WorkerHandle]:
        """Make `fresh` the serving generation; returns the previous one (for the caller to retire)."""
        old, self.current = self.current, fresh
        self.cancel_restarts()
        self._policy.reset()
        return old

    # -- stopping -----------------------------------------------------------------

    def stop(self, kill_after: float) -> Deferred[List[int]]:
        """SIGTERM every worker (they drain), SIGKILL any still running after `kill_after` s; their exit codes."""
        self.stopping = True
        self.cancel_restarts()
        handles = list(self.handles.values())
        for handle in handles:
            handle.retire()

        def kill() -> None:
            for handle in handles:
                if handle.exit_code is None:
                    self._log.error(
                        "worker {slot} (pid {pid}) still draining; SIGKILL", slot=handle.slot, pid=handle.pid
                    )
                    handle.signal(signal.SIGKILL)

        killer = self._clock.callLater(kill_after, kill)

        async def codes() -> List[int]:
            result = [await h.exited for h in handles]
            if killer.active():
                killer.cancel()
            return result

        return Deferred.fromCoroutine(codes())
