"""One worker process: ``python -m relayd.process.worker --config PATH --index N ...``.

The supervisor (relayd/process/supervisor.py) starts one of these per core with
``reactor.spawnProcess``: a fresh interpreter with its own reactor, running
the same service tree as a single-process relayd (`relayd.tap.build_service`),
with three differences:

* ingest listens on sockets the supervisor bound with ``SO_REUSEPORT`` and
  passed as inherited file descriptors (``--listen-fd``), adopted through
  `AdoptedStreamServerEndpoint`; without ``--listen-fd`` the worker binds
  its own ``SO_REUSEPORT`` socket from ``[server] listen`` (standalone use);
* the spool is the first unlocked ``worker-*`` directory below
  ``[spool] dir`` (relayd/outbox/adoption.py), and an `OrphanAdopter` drains
  directories whose worker is gone;
* admin (metrics, readiness) listens on a private unix socket that the
  supervisor scrapes (``--admin unix:PATH``).

File descriptors shared with the supervisor:

0 (stdin)
    The supervisor holds the write end and never writes: EOF means the
    supervisor is gone, and the worker drains and exits (its spool survives
    for the next worker).
``--status-fd`` (3)
    The worker writes status lines (relayd/process/status.py, the one
    definition both sides use): ready once ingest listens and spool
    recovery is done, then a heartbeat every `HEARTBEAT_INTERVAL`, and its
    final counters as it exits.

SIGTERM drains (the same lossless stop as single-process relayd) and exits
0; SIGINT is ignored (a Ctrl-C in a terminal reaches the whole process
group: the supervisor decides), and so is SIGHUP (reload is the
supervisor's job: it starts new workers).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Callable, Dict, Optional, Sequence

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFDSet,
    IReactorSocket,
    IReactorTime,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.listener import SharedSocketsEndpoint, bind_reuseport
from relayd.ops.logs import make_observer, set_process_fields
from relayd.process.status import HEARTBEAT_INTERVAL, FinalMetrics, Heartbeat, Ready, StatusWriter

if TYPE_CHECKING:  # pragma: no cover
    from relayd.ops.metrics import Metrics
    from relayd.tap import RelayService

#: Seconds between checks that the parent still exists (backs up the stdin EOF).
PARENT_POLL_INTERVAL = 1.0

_log = Logger(namespace="relayd.process.worker")


# -- the supervisor link --------------------------------------------------------


@implementer(IReadDescriptor)
class ParentWatcher:
    """Calls `gone()` when stdin reaches EOF or the parent pid changes."""

    def __init__(self, reactor: IReactorTime, gone: Callable[[str], None], fd: int = 0) -> None:
        self._reactor = IReactorFDSet(reactor)
        self._gone = gone
        self._fd = fd
        self._ppid = os.getppid()
        self._fired = False
        self._poll = LoopingCall(self._check)
        self._poll.clock = reactor

    def start(self) -> None:
        """Watch stdin and poll the parent pid."""
        self._reactor.addReader(self)
        self._poll.start(PARENT_POLL_INTERVAL, now=False)

    def fileno(self) -> int:
        """stdin (the supervisor holds the write end)."""
        return self._fd

    def logPrefix(self) -> str:
        """The name in Twisted's log lines."""
        return "parent-watcher"

    def doRead(self) -> None:
        """EOF (or an error) on stdin: the supervisor is gone."""
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._fire("stdin closed")

    def connectionLost(self, reason: Failure) -> None:
        """Nothing to clean up (stdin stays open until exit)."""

    def _check(self) -> None:
        if os.getppid() != self._ppid:
            self._fire("parent pid changed")

    def _fire(self, why: str) -> None:
        self._reactor.removeReader(self)
        if self._poll.running:
            self._poll.stop()
        if not self._fired:
            self._fired = True
            self._gone(why)


def final_counters(metrics: Metrics) -> str:
    """The counters and histograms of `metrics` as text (gauges read closed parts after a stop)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    for value in vars(metrics).values():
        if isinstance(value, (Counter, Histogram)):
            registry.register(value)
    return generate_latest(registry).decode("utf-8")


# -- main ---------------------------------------------------------------------


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m relayd.process.worker", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--index", type=int, default=0, help="worker slot (log field and metrics label)")
    p.add_argument("--generation", type=int, default=0, help="reload generation (log field)")
    p.add_argument("--listen-fd", type=int, action="append", default=[], help="inherited listening socket")
    p.add_argument("--family", choices=("INET", "INET6"), default="INET")
    p.add_argument("--listen", default=None, help="bind this endpoint with SO_REUSEPORT (no --listen-fd)")
    p.add_argument("--admin", default=None, help="admin endpoint (default: [server] admin)")
    p.add_argument("--status-fd", type=int, default=None)
    p.add_argument("--watch-parent", action="store_true", help="exit when stdin closes or the parent changes")
    return p.parse_args(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one worker until SIGTERM (or the supervisor's death); return the exit status."""
    args = _arguments(sys.argv[1:] if argv is None else argv)
    set_process_fields(role="worker", worker=args.index, generation=args.generation, pid=os.getpid())
    globalLogBeginner.beginLoggingTo([make_observer()], redirectStandardIO=False)

    from twisted.internet import reactor as global_reactor
    from twisted.internet.endpoints import serverFromString

    from relayd.config import ConfigError, load_config
    from relayd.ingest.validation import compile_schema_file
    from relayd.outbox.adoption import claim
    from relayd.spool.errors import SpoolError
    from relayd.tap import build_service

    reactor: IReactorCore = global_reactor
    socket_reactor = IReactorSocket(global_reactor)
    clock = IReactorTime(reactor)
    status = StatusWriter(args.status_fd)
    try:
        loaded = load_config(args.config, compile_schema_file)
    except ConfigError as e:
        sys.stderr.write(f"relayd worker {args.index}: {e}\n")
        return 2
    config, validators = loaded.config, loaded.validators

    endpoint: IStreamServerEndpoint
    if args.listen_fd:
        family = socket.AF_INET6 if args.family == "INET6" else socket.AF_INET
        endpoint = SharedSocketsEndpoint(socket_reactor, args.listen_fd, family)
    else:
        try:
            sock = bind_reuseport(args.listen or config.server.listen)
        except (OSError, ValueError) as e:
            sys.stderr.write(f"relayd worker {args.index}: cannot listen: {e}\n")
            return 2
        endpoint = SharedSocketsEndpoint(socket_reactor, [sock.fileno()], sock.family)
        # The endpoint adopts a dup; ours closes once listening starts.
        reactor.callWhenRunning(sock.close)
    admin_endpoint = serverFromString(global_reactor, args.admin or config.server.admin)

    def open_dir(path: str) -> RelayService:
        service = build_service(
            config,
            validators,
            global_reactor,
            spool_path=path,
            listen_endpoint=endpoint,
            admin_endpoint=admin_endpoint,
            worker_index=args.index,
        )
        service.getServiceNamed("spooler").open()  # locks `path` (SpoolLockedError if held)
        return service

    try:
        spool_path, service = claim(config.spool.dir, open_dir)
    except (SpoolError, OSError) as e:
        sys.stderr.write(f"relayd worker {args.index}: spool: {e}\n")
        return 2
    _log.info(
        "worker {worker} starting: pid {pid}, spool {spool}", worker=args.index, pid=os.getpid(), spool=spool_path
    )

    stopping: Dict[str, bool] = {"started": False, "failed": False}

    def shutdown(why: str) -> None:
        if not stopping["started"]:
            _log.info("worker {worker}: {why}; draining", worker=args.index, why=why)
            reactor.stop()

    def started() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            service.privilegedStartService()
            service.startService()
        except SystemExit:
            stopping["failed"] = True
            reactor.stop()
            return
        if args.watch_parent:
            ParentWatcher(clock, lambda why: shutdown(f"supervisor gone ({why})")).start()
        ingest = service.getServiceNamed("ingest")

        def listening(_: object) -> None:
            status.send(Ready(pid=os.getpid(), spool=spool_path))
            heartbeat = LoopingCall(lambda: status.send(Heartbeat(at=clock.seconds())))
            heartbeat.clock = clock
            heartbeat.start(HEARTBEAT_INTERVAL, now=False)

        ingest.listening.addCallback(listening)

    def stop_tree() -> object:
        stopping["started"] = True

        def final(result: object) -> object:
            # Counters of this worker as it leaves: the supervisor keeps them
            # in its aggregate (a scrape could be seconds old).
            if service.metrics is not None:
                status.send(FinalMetrics(text=final_counters(service.metrics)))
            return result

        return service.stopService().addBoth(final)

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", stop_tree)
    reactor.run()
    code = 2 if stopping["failed"] else 0 if service.clean is not False else 1
    _log.info("worker {worker} exiting with status {code}", worker=args.index, code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
