# -*- test-case-name: tests.test_compat -*-
"""Every use of a Twisted private API in relayd, each behind a name.

Twisted's underscore names are free to change in any release.  relayd
relies on a few of them because the public API has no equivalent; keeping
them all here means one file to read when upgrading Twisted, and
tests/test_compat.py checks each one against the installed release (it
fails loudly, naming the private, if the name or its behaviour moved).

What relayd needs and why:

* `parse_endpoint` (``twisted.internet.endpoints._parse``): the endpoint
  string grammar, with its ``\\:`` escapes, to bind ``SO_REUSEPORT``
  sockets and find the systemd-activated socket a description names.
* `inherited_descriptors` / `inherited_named_descriptors`
  (``_SystemdParser._sddaemon``): Twisted reads and *removes*
  ``LISTEN_FDS``/``LISTEN_PID`` when `twisted.internet.endpoints` is
  imported, so its parsed copy is the only source left.
* `close_only_on_stop` (``Port._shouldShutdown``): a listening socket shared
  with other processes must be closed, never ``shutdown()`` (that would stop
  it for every holder).
* `exit_status_zero` (``reactor._exitSignal``): twistd re-raises the stop
  signal on exit (status 143 for SIGTERM); the contract promises 0 after a
  lossless stop.
* `lean_dispatch` (``EPollReactor._poller``, ``_selectables``,
  ``_doReadOrWrite``): the epoll reactor's poll loop without the legacy
  log context it sets up around every ready descriptor (``callWithLogger``:
  a context dict copied, pushed and popped, 1.7 us an event, ~2.5% of a
  stored POST).  That context only names the "system" of *legacy*
  ``twisted.python.log`` lines; relayd logs through `twisted.logger`.
* `header_map` (``Headers._rawHeaders``): the parsed request headers as
  the dict they are, keyed by canonical name, for the ingest hot path's
  five lookups (each ``getRawHeaders`` canonicalizes its name again).
* `HookedHTTPChannel`: `HTTPChannel`'s bad-request path
  (``_respondToBadRequestAndDisconnect``) and its header counters
  (``_receivedHeaderSize``, ``_receivedHeaderCount``) and the current
  request's path (``_path``, known before the Request exists), so that
  ingest can answer header-limit violations with problem documents and
  decide 413 before the body is read.
"""

from __future__ import annotations

import errno
import types
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from twisted.internet import endpoints
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

#: The private attributes relied on, as (owner, name): what tests/test_compat.py checks exists.
PRIVATE_NAMES: Tuple[Tuple[str, str], ...] = (
    ("twisted.internet.endpoints", "_parse"),
    ("twisted.internet.endpoints._SystemdParser", "_sddaemon"),
    ("twisted.internet.tcp.Port", "_shouldShutdown"),
    ("twisted.internet.base.ReactorBase", "_exitSignal"),
    ("twisted.web.http.HTTPChannel", "_respondToBadRequestAndDisconnect"),
    ("twisted.web.http.HTTPChannel", "_receivedHeaderSize"),
    ("twisted.web.http.HTTPChannel", "_receivedHeaderCount"),
    ("twisted.web.http.HTTPChannel", "_path"),
    ("twisted.web.http_headers.Headers", "_rawHeaders"),
    ("twisted.internet.epollreactor.EPollReactor", "_poller"),
    ("twisted.internet.epollreactor.EPollReactor", "_selectables"),
    ("twisted.internet.epollreactor.EPollReactor", "_doReadOrWrite"),
)


def parse_endpoint(description: str) -> Tuple[List[str], Dict[str, str]]:
    """``"tcp:8080:interface=127.0.0.1"`` -> ``(["tcp", "8080"], {"interface": "127.0.0.1"})``.

    Twisted's own grammar (``\\:`` escapes a colon), so relayd reads an
    endpoint string exactly as `serverFromString` does.
    """
    args, kwargs = endpoints._parse(description)
    return [str(a) for a in args], {str(k): str(v) for k, v in kwargs.items()}


def inherited_descriptors() -> List[int]:
    """The systemd-activated descriptors of this process (``LISTEN_FDS``), as Twisted read them at import."""
    return list(endpoints._SystemdParser._sddaemon.inheritedDescriptors())


def inherited_named_descriptors() -> Dict[str, int]:
    """The activated descriptors by ``FileDescriptorName=`` (``LISTEN_FDNAMES``)."""
    return dict(endpoints._SystemdParser._sddaemon.inheritedNamedDescriptors())


def close_only_on_stop(port: IListeningPort) -> None:
    """Make `port` close its socket on `stopListening` without ``shutdown()``.

    ``shutdown`` on a listening socket stops it for every process holding a
    copy; a socket shared by the workers must only be closed.
    """
    port._shouldShutdown = False  # type: ignore[attr-defined]  # tcp.Port private, checked by test_compat


def exit_status_zero(reactor: IReactorCore) -> None:
    """Make twistd exit 0 instead of re-raising the stop signal (status 143 for SIGTERM)."""
    reactor._exitSignal = None  # type: ignore[attr-defined]  # ReactorBase private, checked by test_compat


class HookedHTTPChannel(HTTPChannel):
    """An `HTTPChannel` whose private hooks and counters have public names.

    Subclasses override `bad_request` (called where Twisted would answer a
    bare "400 Bad Request" and disconnect) and read `received_header_size`,
    `received_header_count` and `request_path`.
    """

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted's hook for a malformed or oversized request head -> `bad_request`."""
        self.bad_request()

    def bad_request(self) -> None:
        """Twisted's own answer (a bare 400 and a disconnect); override to answer otherwise."""
        HTTPChannel._respondToBadRequestAndDisconnect(self)

    @property
    def received_header_size(self) -> int:
        """Bytes of request head received so far."""
        size: int = self._receivedHeaderSize
        return size

    @property
    def received_header_count(self) -> int:
        """Header fields received so far."""
        count: int = self._receivedHeaderCount
        return count

    @property
    def request_path(self) -> bytes:
        """The path of the request being received (set once its request line is parsed)."""
        path: bytes = self._path
        return path


def header_map(headers: Headers) -> Mapping[bytes, List[bytes]]:
    """Header values by canonical name (``b"Content-Type"``), as `Headers` keeps them (read only).

    One dict lookup per header instead of `Headers.getRawHeaders`'s name
    canonicalization and two lookups: the ingest hot path reads five.
    """
    raw: Mapping[bytes, List[bytes]] = headers._rawHeaders
    return raw


def _lean_do_poll(self: Any, timeout: Optional[float]) -> None:
    """`EPollReactor.doPoll` minus the ``log.callWithLogger`` wrapper per event.

    `_doReadOrWrite` still catches and logs whatever a protocol raises and
    disconnects it, exactly as before.
    """
    try:
        events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    dispatch = self._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is not None:
            dispatch(selectable, fd, event)


def lean_dispatch(reactor: Any, turn_end: Optional[Callable[[], None]] = None) -> bool:
    """Run `reactor`'s poll loop without the per-event legacy log context (epoll only).

    `turn_end`, if given, is called after the events of each poll were
    dispatched, and before each poll (for what timed calls did since):
    `relayd.wire.TurnSends` sends the answers a turn made there, back to back.

    True if applied; any other reactor (a test's Clock, select, asyncio) is
    left as it is, and `turn_end` is never called.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover - not Linux
        return False
    if not isinstance(reactor, EPollReactor):
        return False
    if turn_end is None:
        reactor.doIteration = types.MethodType(_lean_do_poll, reactor)  # type: ignore[method-assign]
        return True
    end = turn_end

    def do_iteration(timeout: Optional[float]) -> None:
        end()
        _lean_do_poll(reactor, timeout)
        end()

    reactor.doIteration = do_iteration  # type: ignore[method-assign]
    return True
