"""Listening sockets: bound loudly and early, and shared between processes.

twistd calls `privilegedStartService` before the reactor runs (and before
daemonizing), so binding there turns "address in use" or "permission
denied" into an immediate exit with one line on stderr, instead of a
daemon that runs without its port (`ListenerService`).

With several workers (relayd/process/) the ingest port is a set of
``SO_REUSEPORT`` sockets bound by the supervisor (`bind_reuseport`) or one
systemd-activated socket (`systemd_fd`), inherited by every worker and
adopted there through `SharedSocketsEndpoint`.  These helpers live here,
below both the supervisor and the worker, so neither imports the other.
"""

from __future__ import annotations

import socket
import sys
from typing import List, Optional, Sequence, Tuple

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IReactorSocket,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.compat import close_only_on_stop, inherited_descriptors, inherited_named_descriptors, parse_endpoint
from relayd.config import DEFAULT_BACKLOG


class ListenerService(Service):
    """Binds `endpoint` with `factory` at privileged start; stops listening on stop."""

    _log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, what: str) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._what = what
        self.port: Optional[IListeningPort] = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def privilegedStartService(self) -> None:
        """Bind now; exit with status 2 if that fails synchronously."""
        super().privilegedStartService()
        failure: Optional[Failure] = None

        def bound(port: IListeningPort) -> None:
            self.port = port
            self._log.info("{what} listening on {address}", what=self._what, address=port.getHost())
            self.listening.callback(port)

        def failed(f: Failure) -> None:
            nonlocal failure
            failure = f

        self._endpoint.listen(self._factory).addCallbacks(bound, failed)
        if failure is not None:
            sys.stderr.write(f"relayd: cannot listen for {self._what}: {failure.getErrorMessage()}\n")
            sys.stderr.flush()
            raise SystemExit(2)

    def startService(self) -> None:
        """Bind here too when nobody called `privilegedStartService` (tests)."""
        if self.port is None and not self.listening.called:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Stop accepting connections."""
        super().stopService()
        if self.port is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        stopped = self.port.stopListening()
        if isinstance(stopped, Deferred):
            stopped.chainDeferred(d)
        else:
            d.callback(None)
        return d


# -- sockets shared by several processes ----------------------------------------


@attrs.frozen
class TCPSpec:
    """What `bind_reuseport` binds: the parsed ``tcp:``/``tcp6:`` endpoint string."""

    kind: str
    port: int
    interface: str
    backlog: int


def parse_tcp_endpoint(description: str) -> TCPSpec:
    """``tcp:8080:interface=127.0.0.1:backlog=50`` -> its kind, port, interface and backlog.

    Only the endpoint types a process can bind itself (``tcp``/``tcp6``);
    raises ValueError for others.
    """
    args, kwargs = parse_endpoint(description)
    kind = args[0].lower() if args else ""
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"cannot bind {description!r} with SO_REUSEPORT (only tcp: and tcp6: endpoints)")
    port = kwargs.get("port", args[1] if len(args) > 1 else None)
    if port is None:
        raise ValueError(f"no port in {description!r}")
    default_iface = "::" if kind == "tcp6" else ""
    return TCPSpec(
        kind=kind,
        port=int(port),
        interface=kwargs.get("interface", args[2] if len(args) > 2 else default_iface),
        backlog=int(kwargs.get("backlog", DEFAULT_BACKLOG)),
    )


def bind_reuseport(description: str) -> socket.socket:
    """A non-blocking listening socket for a ``tcp:``/``tcp6:`` endpoint, with SO_REUSEPORT."""
    spec = parse_tcp_endpoint(description)
    family = socket.AF_INET6 if spec.kind == "tcp6" or ":" in spec.interface else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((spec.interface, spec.port))
        s.listen(spec.backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def systemd_fd(description: str) -> Tuple[int, socket.AddressFamily]:
    """The inherited fd and family of a ``systemd:domain=INET:index=0`` (or ``name=``) endpoint."""
    _, kwargs = parse_endpoint(description)
    fds = inherited_descriptors()
    if not fds:
        raise ValueError(f"{description}: not socket-activated (no LISTEN_FDS for this pid)")
    if "index" in kwargs:
        index = int(kwargs["index"])
        if not 0 <= index < len(fds):
            raise ValueError(f"{description}: index {index} but {len(fds)} activated socket(s)")
        fd = fds[index]
    elif "name" in kwargs:
        named = inherited_named_descriptors()
        if kwargs["name"] not in named:
            raise ValueError(f"{description}: no activated socket named {kwargs['name']!r}")
        fd = named[kwargs["name"]]
    else:
        fd = fds[0]
    family = socket.AF_INET6 if kwargs.get("domain", "INET").upper() == "INET6" else socket.AF_INET
    return fd, family


@implementer(IListeningPort)
class _Ports:
    """Several listening ports that stop together (what `ListenerService` needs of a port)."""

    def __init__(self, ports: List[IListeningPort]) -> None:
        self.ports = ports

    def startListening(self) -> None:
        """Already listening (adopted ports listen at once)."""

    def getHost(self) -> IAddress:
        """The first socket's address (they all share one)."""
        return self.ports[0].getHost()

    def stopListening(self) -> Deferred[None]:
        """Close every socket (close only: see `SharedSocketsEndpoint`)."""
        ds: List[Deferred[None]] = []
        for port in self.ports:
            stopped = port.stopListening()
            if isinstance(stopped, Deferred):
                ds.append(stopped)
        return gatherResults(ds).addCallback(lambda _: None)


@implementer(IStreamServerEndpoint)
class SharedSocketsEndpoint:
    """Listen on inherited listening sockets that other processes share.

    `AdoptedStreamServerEndpoint` for each fd, with one change: Twisted's
    port calls ``shutdown()`` on its socket when it stops listening, and
    ``shutdown`` on a listening socket stops it for *every* process holding
    it (pending connections are reset).  A shared socket must only be
    closed, so the new worker of a reload keeps accepting from it.
    """

    def __init__(self, reactor: IReactorSocket, fds: Sequence[int], family: int) -> None:
        self._reactor = reactor
        self._fds = list(fds)
        self._family = family

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Adopt every fd; one port object that stops them all."""

        def adopted(ports: List[IListeningPort]) -> IListeningPort:
            for port in ports:
                close_only_on_stop(port)
            return _Ports(ports)

        ds = [
            AdoptedStreamServerEndpoint(self._reactor, fd, socket.AddressFamily(self._family)).listen(protocolFactory)
            for fd in self._fds
        ]
        return gatherResults(ds, consumeErrors=True).addCallback(adopted)
