# -*- test-case-name: tests.test_workers -*-
"""Reload generations: a new set of workers takes over before the old one drains.

Generation 0 starts with the daemon.  On SIGHUP the config is loaded and
fully validated first; a bad one is rejected with a log line and nothing
changes.  Otherwise generation g+1 is started on the same sockets (more are
bound if the worker count grew); only when all of its workers are ready
are the old ones sent SIGTERM (they drain as on a stop).  If a new worker
fails before it is ready (or `WORKER_START_TIMEOUT` passes), the new
generation is stopped and the old one keeps serving.  ``listen`` and
``admin`` changes need a restart (logged); everything else, including the
number of workers, is applied.

Each generation's workers read a snapshot of the config text it was
validated from (relative paths still resolve against the daemon's working
directory), so a crashed worker is restarted with its own generation's
config, not with whatever the file says now.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.config import Config, ConfigError, LoadedConfig, resolve_workers
from relayd.process.pool import WorkerHandle, WorkerPool
from relayd.process.rundir import RunDir
from relayd.process.sdnotify import SupervisorNotify
from relayd.process.sockets import IngestSockets

#: Seconds a new worker (start or reload) gets to report ready.
WORKER_START_TIMEOUT = 60.0


def first_error(failure: Failure) -> BaseException:
    """The worker's own error inside a `DeferredList(fireOnOneErrback=True)` failure."""
    sub = getattr(failure.value, "subFailure", None)
    error = sub.value if isinstance(sub, Failure) else failure.value
    assert error is not None
    return error


class Generations:
    """Which config the workers run, and the switch from one generation to the next."""

    _log = Logger(namespace="relayd.process.supervisor")

    def __init__(
        self,
        reactor: IReactorTime,
        pool: WorkerPool,
        sockets: IngestSockets,
        rundir: RunDir,
        notify: SupervisorNotify,
        load: Callable[[], LoadedConfig],
        config: Config,
        text: str,
    ) -> None:
        self._clock = reactor
        self._pool = pool
        self._sockets = sockets
        self._rundir = rundir
        self._notify = notify
        self._load = load
        self.config = config
        self._texts: Dict[int, str] = {0: text}
        self.generation = 0
        self._reloading = False

    def _write_snapshot(self, generation: int) -> str:
        path = self._rundir.config_snapshot(generation)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self._texts[generation])
        return path

    def _start(self, generation: int, workers: int) -> List[WorkerHandle]:
        config_path = self._write_snapshot(generation)
        return [self._pool.spawn(slot, generation, workers, config_path) for slot in range(workers)]

    def _all_ready(self, handles: List[WorkerHandle]) -> Deferred[List[Tuple[bool, WorkerHandle]]]:
        return DeferredList([self._pool.wait_ready(h) for h in handles], fireOnOneErrback=True, consumeErrors=True)

    def start(self) -> Deferred[List[Tuple[bool, WorkerHandle]]]:
        """Start generation 0; fires when all of its workers are ready, fails when one exits first."""
        workers = resolve_workers(self.config.server.workers)
        self._pool.current = self._start(0, workers)
        return self._all_ready(self._pool.current)

    def reload(self) -> Deferred[bool]:
        """Start a new generation from the (validated) config file; retire the old one when it is ready."""
        if self._pool.stopping:
            return succeed(False)
        if self._reloading:
            self._log.warn("SIGHUP: a reload is already in progress; ignored")
            return succeed(False)
        try:
            loaded = self._load()
        except ConfigError as e:
            self._log.error("SIGHUP: config rejected, old workers keep serving: {error}", error=str(e))
            return succeed(False)
        new = loaded.config
        if new.server.listen != self.config.server.listen or new.server.admin != self.config.server.admin:
            self._log.warn("SIGHUP: [server] listen/admin changes need a restart; keeping the old ones")
            new = attrs.evolve(
                new, server=attrs.evolve(new.server, listen=self.config.server.listen, admin=self.config.server.admin)
            )
        workers = resolve_workers(new.server.workers)
        try:
            self._sockets.bind(workers)
        except (OSError, ValueError) as e:
            self._log.error(
                "SIGHUP: cannot bind for {n} workers ({error}); old workers keep serving", n=workers, error=e
            )
            return succeed(False)
        self._reloading = True
        self._notify.reloading()
        self.generation += 1
        generation = self.generation
        self._texts[generation] = loaded.text
        self._log.info("SIGHUP: starting generation {g} ({n} workers)", g=generation, n=workers)
        fresh = self._start(generation, workers)
        waits = [self._pool.wait_ready(h) for h in fresh]

        def give_up() -> None:
            for d in waits:
                if not d.called:
                    d.cancel()

        timeout = self._clock.callLater(WORKER_START_TIMEOUT, give_up)
        done = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)

        def succeeded(_: object) -> bool:
            old = self._pool.serve(fresh)
            self.config = new
            for handle in old:
                handle.retire()
            self._log.info("SIGHUP: generation {g} serving; {n} old workers draining", g=generation, n=len(old))
            self._notify.status(f"{len(fresh)} workers ready (generation {generation})")
            return True

        def failed(failure: Failure) -> bool:
            self._log.error(
                "SIGHUP: new workers failed ({error}); old workers keep serving", error=str(first_error(failure))
            )
            for handle in fresh:
                handle.retire()
            self._notify.status("reload failed; previous workers serving")
            return False

        def finish(result: bool) -> bool:
            self._reloading = False
            if timeout.active():
                timeout.cancel()
            return result

        return done.addCallbacks(succeeded, failed).addBoth(finish)
