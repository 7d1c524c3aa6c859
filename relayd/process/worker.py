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
    The worker writes JSON lines: ``{"ready": true}`` once ingest listens
    and spool recovery is done, then a heartbeat every `HEARTBEAT_INTERVAL`
    that the supervisor uses for its systemd watchdog.

SIGTERM drains (the same lossless stop as single-process relayd) and exits
0; SIGINT is ignored (a Ctrl-C in a terminal reaches the whole process
group: the supervisor decides), and so is SIGHUP (reload is the
supervisor's job: it starts new workers).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import sys
from typing import Any, Dict, List, Optional, Sequence

from twisted.internet.defer import gatherResults
from twisted.logger import Logger, globalLogBeginner

from relayd.ops.logs import make_observer, set_process_fields

#: Seconds between heartbeats: the supervisor restarts a worker that stays
#: silent for `[server] worker_timeout` and only pings systemd's watchdog
#: while every worker's heartbeat is fresh.
HEARTBEAT_INTERVAL = 1.0
#: Seconds between checks that the parent still exists (backs up the stdin EOF).
PARENT_POLL_INTERVAL = 1.0

_log = Logger(namespace="relayd.process.worker")


# -- listening sockets -------------------------------------------------------


def parse_tcp_endpoint(description: str) -> Dict[str, Any]:
    """``tcp:8080:interface=127.0.0.1:backlog=50`` -> ``{"kind", "port", "interface", "backlog"}``.

    Only the endpoint types a worker can bind itself (``tcp``/``tcp6``);
    raises ValueError for others.
    """
    from twisted.internet.endpoints import _parse  # stable private helper: handles "\:" escapes

    args, kwargs = _parse(description)
    kind = args[0].lower() if args else ""
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"cannot bind {description!r} with SO_REUSEPORT (only tcp: and tcp6: endpoints)")
    port = kwargs.get("port", args[1] if len(args) > 1 else None)
    if port is None:
        raise ValueError(f"no port in {description!r}")
    default_iface = "::" if kind == "tcp6" else ""
    return {
        "kind": kind,
        "port": int(port),
        "interface": kwargs.get("interface", args[2] if len(args) > 2 else default_iface),
        "backlog": int(kwargs.get("backlog", 50)),
    }


def bind_reuseport(description: str) -> socket.socket:
    """A non-blocking listening socket for a ``tcp:``/``tcp6:`` endpoint, with SO_REUSEPORT."""
    spec = parse_tcp_endpoint(description)
    family = socket.AF_INET6 if spec["kind"] == "tcp6" or ":" in spec["interface"] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((spec["interface"], spec["port"]))
        s.listen(spec["backlog"])
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class _Ports:
    """Several listening ports that stop together (what `ListenerService` needs of a port)."""

    def __init__(self, ports: List[Any]) -> None:
        self.ports = ports

    def getHost(self) -> Any:
        return self.ports[0].getHost()

    def stopListening(self) -> Any:
        return gatherResults([p.stopListening() for p in self.ports])


class SharedSocketsEndpoint:
    """Listen on inherited listening sockets that other processes share.

    `AdoptedStreamServerEndpoint` for each fd, with one change: Twisted's
    port calls ``shutdown()`` on its socket when it stops listening, and
    ``shutdown`` on a listening socket stops it for *every* process holding
    it (pending connections are reset).  A shared socket must only be
    closed, so the new worker of a reload keeps accepting from it.
    """

    def __init__(self, reactor: Any, fds: Sequence[int], family: int) -> None:
        self._reactor = reactor
        self._fds = list(fds)
        self._family = family

    def listen(self, factory: Any) -> Any:
        from twisted.internet.endpoints import AdoptedStreamServerEndpoint

        def adopted(ports: List[Any]) -> _Ports:
            for port in ports:
                port._shouldShutdown = False  # close only; see the class docstring
            return _Ports(ports)

        ds = [AdoptedStreamServerEndpoint(self._reactor, fd, self._family).listen(factory) for fd in self._fds]
        return gatherResults(ds, consumeErrors=True).addCallback(adopted)


# -- the supervisor link --------------------------------------------------------


class StatusPipe:
    """JSON lines to the supervisor; a gone supervisor is not an error."""

    def __init__(self, fd: Optional[int]) -> None:
        self._fd = fd

    def send(self, **fields: Any) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, json.dumps(fields).encode() + b"\n")
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.EBADF):
                self._fd = None
            # EAGAIN: a busy supervisor misses one heartbeat; the next one counts


class ParentWatcher:
    """Calls `gone()` when stdin reaches EOF or the parent pid changes."""

    def __init__(self, reactor: Any, gone: Any, fd: int = 0) -> None:
        from twisted.internet.task import LoopingCall

        self._reactor = reactor
        self._gone = gone
        self._fd = fd
        self._ppid = os.getppid()
        self._fired = False
        self._poll = LoopingCall(self._check)
        self._poll.clock = reactor

    def start(self) -> None:
        self._reactor.addReader(self)
        self._poll.start(PARENT_POLL_INTERVAL, now=False)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "parent-watcher"

    def doRead(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._fire("stdin closed")

    def connectionLost(self, reason: Any) -> None:
        pass

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


def final_counters(metrics: Any) -> str:
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

    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from relayd.config import ConfigError, load_config
    from relayd.ingest.validation import compile_schema_file
    from relayd.outbox.adoption import claim
    from relayd.tap import build_service

    status = StatusPipe(args.status_fd)
    try:
        config, validators = load_config(args.config, compile_schema_file)
    except ConfigError as e:
        sys.stderr.write(f"relayd worker {args.index}: {e}\n")
        return 2

    if args.listen_fd:
        family = socket.AF_INET6 if args.family == "INET6" else socket.AF_INET
        endpoint: Any = SharedSocketsEndpoint(reactor, args.listen_fd, family)
    else:
        try:
            sock = bind_reuseport(args.listen or config.server.listen)
        except (OSError, ValueError) as e:
            sys.stderr.write(f"relayd worker {args.index}: cannot listen: {e}\n")
            return 2
        endpoint = SharedSocketsEndpoint(reactor, [sock.fileno()], sock.family)
        # The endpoint adopts a dup; ours closes once listening starts.
        reactor.callWhenRunning(sock.close)
    admin_endpoint = serverFromString(reactor, args.admin or config.server.admin)

    def open_dir(path: str) -> Any:
        service = build_service(
            config,
            validators,
            reactor,
            spool_path=path,
            listen_endpoint=endpoint,
            admin_endpoint=admin_endpoint,
            worker_index=args.index,
        )
        service.getServiceNamed("spooler").open()  # locks `path` (SpoolLockedError if held)
        return service

    from relayd.spool.errors import SpoolError

    try:
        spool_path, service = claim(config.spool.dir, open_dir)
    except (SpoolError, OSError) as e:
        sys.stderr.write(f"relayd worker {args.index}: spool: {e}\n")
        return 2
    _log.info(
        "worker {worker} starting: pid {pid}, spool {spool}", worker=args.index, pid=os.getpid(), spool=spool_path
    )

    stopping = {"started": False, "failed": False}

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
            ParentWatcher(reactor, lambda why: shutdown(f"supervisor gone ({why})")).start()
        ingest = service.getServiceNamed("ingest")

        def listening(_: object) -> None:
            status.send(ready=True, pid=os.getpid(), spool=spool_path)
            from twisted.internet.task import LoopingCall

            heartbeat = LoopingCall(lambda: status.send(hb=reactor.seconds()))
            heartbeat.clock = reactor
            heartbeat.start(HEARTBEAT_INTERVAL, now=False)

        ingest.listening.addCallback(listening)

    def stop_tree() -> Any:
        stopping["started"] = True

        def final(result: Any) -> Any:
            # Counters of this worker as it leaves: the supervisor keeps them
            # in its aggregate (a scrape could be seconds old).
            metrics = getattr(service, "metrics", None)
            if metrics is not None:
                status.send(final_metrics=final_counters(metrics))
            return result

        return service.stopService().addBoth(final)

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", stop_tree)
    reactor.run()
    clean = getattr(service, "clean", None)
    code = 2 if stopping["failed"] else 0 if clean is not False else 1
    _log.info("worker {worker} exiting with status {code}", worker=args.index, code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
