"""The Redis connection: one binary-safe, self-healing client per process.

txredisapi's protocol speaks RESP well, but its connection management has
traps (CONVENTIONS.md): commands issued while disconnected wait forever
unless a reply timeout is set (txredisapi issue 112), and a failed AUTH or
SELECT stops reconnecting for good (issue 146).  So relayd keeps only the
protocol and drives the connection with Twisted's own `ClientService`:

- reconnect with jittered exponential backoff on the injected clock;
- AUTH and SELECT run in `prepareConnection`: when they fail, ClientService
  drops that connection and retries with backoff like any connect failure;
- every command has a reply timeout, and a command issued while no
  connection is ready fails at once with `ConnectionError` (the forwarder
  then keeps the messages and retries; nothing waits forever);
- ``charset=None, convertNumbers=False``: values go out and come back as
  the exact bytes (no decoding, no "123" -> 123 rewriting).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Generator, List, Optional, Sequence, Set

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, inlineCallbacks, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger

from relayd.config import RedisConfig
from relayd.wire import lift_send_limit

ConnectionError = txredisapi.ConnectionError
ResponseError = txredisapi.ResponseError
TimeoutError = txredisapi.TimeoutError

# Reconnect backoff: first retry fast (a Redis restart takes ~100 ms), cap
# at 5 s so readiness comes back within seconds of Redis doing so.
RECONNECT_INITIAL_DELAY = 0.1
RECONNECT_MAX_DELAY = 5.0


if txredisapi.hiredis is None:  # pragma: no cover - a broken install, not a runtime state
    # HiredisProtocol would fail in connectionMade on every connection, which
    # looks like a Redis that keeps refusing us: say what is wrong instead.
    raise ImportError("relayd needs the hiredis package (a dependency in setup.py): pip install hiredis")


class RelaydRedisProtocol(txredisapi.HiredisProtocol):  # type: ignore[misc]  # txredisapi has no type hints
    """txredisapi's protocol with hiredis's reply parser, a clock of our choosing and a lean encoder.

    Named explicitly (txredisapi silently falls back to its own parser when
    hiredis is missing): that pure-Python parser pauses the transport and
    waits a reactor turn (``callLater(0)``) after *every* bulk string, so a
    reply of N bulks takes N reactor iterations and two epoll changes each;
    an XREAD of a thousand entries then took seconds under load
    (docs/benchmarks.md, fan-out).  hiredis parses a reply in C, in one call.
    """

    def connectionMade(self) -> Any:
        """Disable Nagle: with several small LPUSHes in flight, Nagle plus
        delayed ACKs holds the second one for up to 40 ms.  And let one send
        carry a whole batch (`relayd.wire.lift_send_limit`)."""
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        lift_send_limit(self.transport)
        result = super().connectionMade()  # no AUTH/SELECT here: completes at once
        self.factory.connection_made(self)
        return result

    def tryConvertData(self, data: Any) -> Any:
        """Replies as hiredis made them: no decoding, no number conversion (bytes in, bytes out).

        txredisapi's version walks every reply (recursively for arrays) to
        do what ``charset=None, convertNumbers=False`` turns off anyway.
        """
        return data

    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        """RESP-encode a command; ~3x faster than txredisapi's for LPUSH of many values.

        All-bytes arguments (every hot command: LPUSH batches, the counters'
        scripts with tens of thousands of arguments) are interleaved with
        their ``$<len>`` headers by slice assignment and joined once, so the
        per-argument work is one header lookup (~0.05 us an argument against
        ~0.17 us for a formatted piece per argument); str and int arguments
        are encoded first (UTF-8, decimal).
        """
        try:
            return _encode_bytes(args)
        except TypeError:  # a str or an int (a count, a TTL) among the arguments: encode them first
            return _encode_bytes(
                tuple(
                    a if isinstance(a, bytes) else a.encode("utf-8") if isinstance(a, str) else str(a).encode("ascii")
                    for a in args
                )
            )


def _encode_bytes(args: Sequence[Any]) -> bytes:
    """RESP array of bulk strings; TypeError unless every argument is bytes-like.

    One join makes the whole command (the ``*<n>`` header first, an empty
    last piece for the final CRLF): gluing a header and a trailer onto a
    joined body copied the body again, and for a 1000-message LPUSH
    (~330 KB, above malloc's mmap threshold, so fresh pages every time)
    that second copy was 0.35 of the 0.41 us per message.
    """
    n = len(args)
    out: List[Any] = [b""] * (2 * n + 2)
    out[0] = b"*%d" % n
    out[1:-1:2] = [_HEADERS[size] if size < _HEADER_CACHE else b"$%d" % size for size in map(len, args)]
    out[2:-1:2] = args
    return b"\r\n".join(out)


#: ``$<len>`` bulk headers of the common argument sizes, precomputed.
_HEADER_CACHE = 4096
_HEADERS = [b"$%d" % size for size in range(_HEADER_CACHE)]


class _ProtocolFactory(Factory):
    """Builds protocols wired to the injected clock."""

    noisy = False  # no "Starting factory" line per reconnect attempt

    def __init__(self, clock: IReactorTime, reply_timeout: float, connection_made: Callable[[Any], object]) -> None:
        self._clock = clock
        self._reply_timeout = reply_timeout
        self.connection_made = connection_made

    def buildProtocol(self, addr: Optional[IAddress]) -> RelaydRedisProtocol:
        p = RelaydRedisProtocol(charset=None, replyTimeout=self._reply_timeout, convertNumbers=False)
        p.callLater = self._clock.callLater  # txredisapi defaults to the global reactor
        p.factory = self
        return p

    # txredisapi's protocol calls these on AUTH/SELECT failure and QUIT; we
    # never let it run AUTH/SELECT itself, and reconnecting is ClientService's job.
    def stopTrying(self) -> None:
        """No-op: ClientService owns reconnection."""

    def connectionError(self, message: str) -> None:
        """No-op: failures surface through the client's handshake."""


class RedisClient(Service):
    """A reconnecting Redis client exposing the few commands relayd needs."""

    _log = Logger()

    def __init__(
        self, reactor: IReactorTime, config: RedisConfig, endpoint: Optional[IStreamClientEndpoint] = None
    ) -> None:
        self._reactor = reactor
        self._config = config
        if endpoint is None:
            endpoint = HostnameEndpoint(reactor, config.host, config.port, timeout=config.connect_timeout)
        self._service = ClientService(
            endpoint,
            _ProtocolFactory(reactor, config.reply_timeout, self._handshake),
            retryPolicy=backoffPolicy(
                RECONNECT_INITIAL_DELAY, RECONNECT_MAX_DELAY, jitter=lambda: random.uniform(0, RECONNECT_INITIAL_DELAY)
            ),
            clock=reactor,
        )
        self._proto: Optional[RelaydRedisProtocol] = None
        self._ready_listeners: List[Callable[[], None]] = []
        self._lost_listeners: List[Callable[[], None]] = []
        self._was_down_logged = False
        self._setup_failures = 0
        self._backoffs: Set[Deferred[None]] = set()  # handshake back-off waits, cancelled on stop

    @property
    def ready(self) -> bool:
        """True while a prepared connection is up (commands can be issued)."""
        return self._proto is not None

    def on_ready(self, listener: Callable[[], None]) -> None:
        """Call `listener()` each time a connection becomes ready."""
        self._ready_listeners.append(listener)

    def on_lost(self, listener: Callable[[], None]) -> None:
        """Call `listener()` each time a ready connection is lost (a cluster re-reads its map then)."""
        self._lost_listeners.append(listener)

    @inlineCallbacks
    def _handshake(self, proto: RelaydRedisProtocol) -> Generator[Deferred[Any], Any, None]:
        """AUTH, SELECT and a PING on a new connection; only then is it ready.

        Not ClientService's `prepareConnection`: a failed preparation leaves
        the socket open (one leak per attempt) and a connection lost during
        it is a state ClientService does not handle.  Here ClientService
        just sees a connection; on failure we close it after a growing
        delay and it reconnects, so a wrong password is retried for ever
        (txredisapi stops for good here: its issue 146).

        The PING matters with no AUTH/SELECT too: a frozen Redis (SIGSTOP,
        swapping) still accepts TCP connections in the kernel; without an
        answer required first, every reconnect would re-send the oldest
        batches into its socket buffers, and each copy would run on thaw.
        """
        cfg = self._config
        try:
            if cfg.password is not None:
                args = [cfg.username, cfg.password] if cfg.username else [cfg.password]
                yield proto.execute_command(b"AUTH", *args)
            if cfg.db:
                yield proto.execute_command(b"SELECT", cfg.db)
            yield proto.execute_command(b"PING")
        except Exception as e:
            if not self.running:  # stopped while the handshake ran: no back-off timer to leave behind
                if proto.transport is not None and proto.connected:
                    proto.transport.loseConnection()
                return
            self._setup_failures += 1
            if self._setup_failures == 1:
                self._log.error("redis handshake (AUTH/SELECT/PING) failed: {error}; retrying with backoff", error=e)
            delay = min(RECONNECT_INITIAL_DELAY * 2**self._setup_failures, RECONNECT_MAX_DELAY)
            wait = deferLater(self._reactor, delay, lambda: None)
            self._backoffs.add(wait)
            try:
                yield wait
            except CancelledError:
                pass  # stopping
            finally:
                self._backoffs.discard(wait)
            if proto.transport is not None and proto.connected:
                proto.transport.loseConnection()
            return
        if not proto.connected or not self.running:
            return
        self._setup_failures = 0
        # whenDisconnected fires before pending replies fail, so nothing is
        # sent on a dead link.
        proto.whenDisconnected().addCallback(lambda _: self._lost(proto))
        self._proto = proto
        self._log.info("redis connected to {host}:{port} db {db}", host=cfg.host, port=cfg.port, db=cfg.db)
        self._was_down_logged = False
        self._notify_ready(proto)

    def _notify_ready(self, proto: Any) -> None:
        if self._proto is proto:
            for listener in list(self._ready_listeners):
                listener()

    def _lost(self, proto: Any) -> None:
        if self._proto is proto:
            self._proto = None
            if not self._was_down_logged:
                cfg = self._config
                self._log.warn(
                    "redis connection to {host}:{port} lost; reconnecting with backoff", host=cfg.host, port=cfg.port
                )
                self._was_down_logged = True
            for listener in list(self._lost_listeners):
                listener()

    def startService(self) -> None:
        """Start connecting (and reconnecting)."""
        super().startService()
        self._service.startService()

    def stopService(self) -> Deferred[None]:
        """Close the connection and stop reconnecting (idempotent)."""
        if not self.running:
            return succeed(None)
        super().stopService()
        self._proto = None
        for wait in list(self._backoffs):
            wait.cancel()
        return self._service.stopService()

    def execute(self, *args: Any) -> Deferred[Any]:
        """Run one command; fails at once with ConnectionError when not ready."""
        proto = self._proto
        if proto is None:
            return fail(ConnectionError("redis not connected"))
        try:
            d: Deferred[Any] = proto.execute_command(*args)  # txredisapi is untyped
            return d
        except Exception:
            return fail()

    def lpush(self, key: bytes, values: List[bytes]) -> Deferred[Any]:
        """``LPUSH key v1 .. vN``: one command, one round trip, FIFO for RPOP."""
        proto = self._proto
        if proto is None:
            return fail(ConnectionError("redis not connected"))
        try:
            d: Deferred[Any] = proto.execute_command(b"LPUSH", key, *values)  # txredisapi is untyped
            return d
        except Exception:
            return fail()
