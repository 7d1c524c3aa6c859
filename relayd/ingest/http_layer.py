"""The twisted.web layer under ingest: the guards twisted.web lacks.

The domain (routes, parsing, acks) lives in `relayd.ingest.app`; this module
keeps the HTTP machinery honest about resources (CONVENTIONS.md):

- `IngestChannel` decides 413 from Content-Length *before* the body is read
  (twisted.web buffers whole bodies and has no cap of its own), cuts slow
  clients with head/body deadlines (its idle timeout restarts on every
  byte), and answers header-limit violations with problem documents;
- `IngestRequest` keeps bodies in memory (no temp files: the cap is small),
  counts chunked bodies against the cap as they arrive, skips the
  email-package form parsing, and hands POSTs to configured routes straight
  to `IngestApp.serve` (Klein keeps everything else);
- `IngestSite` writes no access log (34% of a request's cost here), caches
  the Date header, enforces connection caps and tracks connections so a
  graceful stop can close idle keep-alives.
"""

from __future__ import annotations

from io import BytesIO
from typing import TYPE_CHECKING, Any, Dict, Optional, Set

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.server import Request, Site

from relayd.compat import HookedHTTPChannel
from relayd.config import LimitsConfig
from relayd.ingest.problems import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    HeadersTooLarge,
    PayloadTooLarge,
    Problem,
    RequestTimeout,
    TooManyConnections,
    render_problem,
)
from relayd.ops.metrics import Metrics
from relayd.wire import TurnSends, direct_writer

DEADLINE_SWEEP = 0.25  # seconds: resolution of head/body deadlines
_COMPUTED_HEADERS = frozenset((b"Date", b"Content-Length"))  # `IngestRequest.respond` writes its own

if TYPE_CHECKING:  # pragma: no cover
    from relayd.ingest.app import IngestApp


def _raw_problem(problem: Problem) -> bytes:
    """A complete HTTP/1.1 response for errors raised before a Request exists."""
    body = render_problem(problem)
    extra = b"".join(b"%s: %s\r\n" % (name, value) for name, value in problem.headers)
    if problem.retry_after is not None:
        extra += b"Retry-After: %d\r\n" % problem.retry_after
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n"
        % (problem.status, problem.title.encode(), PROBLEM_CONTENT_TYPE, len(body), extra)
    )
    return head + body


class IngestRequest(Request):
    """A Request that keeps bodies in memory, bounded, and parses no forms."""

    channel: IngestChannel
    content: Any

    _body_limit = 0
    _body_seen = 0
    _rejected = False
    gone_waiter: Any = None  # has `client_gone()`: called if the connection is lost first

    def __init__(self, channel: HTTPChannel, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)

    def gotLength(self, length: Optional[int]) -> None:
        """Always a BytesIO (Twisted uses temp files above 100 kB or when chunked)."""
        self.content = BytesIO()
        self._body_limit = self.channel.body_limit

    def handleContentChunk(self, data: bytes) -> None:
        """Append body bytes, cutting off a chunked body at the route's cap."""
        if self._rejected:
            return
        self._body_seen += len(data)
        if self._body_seen > self._body_limit:
            self._rejected = True
            self.channel.reject(PayloadTooLarge(f"body exceeds {self._body_limit} bytes"))
            return
        self.content.write(data)

    def connectionLost(self, reason: Failure) -> None:
        """The client left before its response: tell the waiter (if any) at once.

        Instead of a ``notifyFinish()`` Deferred per stored request (and its
        errback), which costs more than the rest of the ack plumbing.
        """
        super().connectionLost(reason)
        waiter = self.gone_waiter
        if waiter is not None:
            self.gone_waiter = None
            waiter.client_gone()

    @property
    def gone(self) -> bool:
        """The connection was lost before the response was finished."""
        return bool(self._disconnected)

    def respond(self, body: bytes, content_type: Optional[bytes] = None, at_turn_end: bool = False) -> None:
        """Write the whole response as one buffer and finish (the hot path).

        The bytes twisted.web sends for a response with a Content-Length
        (status line, Date, the headers set on this request, Content-Length,
        body), built in one pass instead of through `Headers`, `writeHeaders`
        (a sequence of ~20 small writes) and a second write for the body.
        Content-Length is always computed here; a Date or Content-Length set
        on the request is not sent twice.  `at_turn_end`: an answer given
        while its request is read (accepted acks, problems) leaves when the
        reactor turn ends, with the turn's others (`relayd.wire.TurnSends`).
        """
        if self.startedWriting or self.finished or self._disconnected:
            self.write(body)  # twisted.web's own checks and errors
            self.finish()
            return
        head = [b"%s %d %s\r\nDate: %s\r\n" % (self.clientproto, self.code, self.code_message, self.channel.site.date_header())]
        if content_type is not None:
            head.append(b"Content-Type: %s\r\n" % content_type)
        for name, values in self.responseHeaders.getAllRawHeaders():
            if name in _COMPUTED_HEADERS:
                continue
            for value in values:
                head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        head.append(body)
        self.startedWriting = 1
        self.sentLength = len(body)
        channel = self.channel
        (channel.send_at_turn_end if at_turn_end else channel.send_now)(b"".join(head))
        self.finish()

    def process(self) -> None:
        """Serve POSTs to routes directly; everything else through Klein.

        Skipped on the hot path: the Server header, Twisted's resource
        traversal and Klein's URL map binding (together ~45% of a request).
        """
        if self._rejected:
            return
        site = self.channel.site
        route = site.app.route_for(self)
        if route is None:
            if site.app.subscriber_for(self):
                # Server-Sent Events (relayd/fanout/): a response that lasts;
                # no idle timeout (the head/body deadlines ended with the
                # request), still one of the site's counted connections.
                self.site = site
                self.setHeader(b"Date", site.date_header())
                self.channel.setTimeout(None)
                site.app.subscribe(self)
                return
            super().process()
            return
        self.site = site  # Date: written by `respond`
        site.app.serve(self, route)


class IngestChannel(HookedHTTPChannel):
    """An HTTPChannel with the guards twisted.web lacks.

    - 413 from Content-Length before any body byte is read;
    - deadlines for a request's head (`header_timeout`) and body
      (`body_timeout`), counted from the request's first byte: twisted.web's
      idle timeout restarts on every byte, so a client dribbling one byte a
      second would hold the connection for ever (slowloris);
    - header count and size caps answered with a 431/400 problem document
      (twisted.web sends a bare "400 Bad Request").
    """

    site: IngestSite
    transport: Any
    body_limit = 0
    _phase = "idle"  # idle -> head -> body -> handling -> idle
    _deadline_at = 0.0  # when the current head/body deadline passes (0: none)
    _deadline_what = ""
    peer = ""

    def connectionMade(self) -> None:
        """Register with the site and apply its header limits."""
        # Every Request asks for both addresses; for TCP each getHost() is a
        # getsockname() syscall plus an address object (~10% of a request).
        self._host_address = self.transport.getHost()
        self._peer_address = self.transport.getPeer()
        # A whole response is one write, sent at once when nothing is pending
        # (relayd/wire.py): no epoll_ctl pair and reactor turn per request.
        # An answer given while the request is read waits for the turn's end,
        # to leave with that turn's other answers (`TurnSends`).
        self.send_now = direct_writer(self.transport)
        self.send_at_turn_end = self.site.sends.writer(self.transport)
        super().connectionMade()
        limits = self.site.limits
        self.maxHeaders = limits.max_headers
        self.totalHeadersSize = limits.max_header_bytes
        self.MAX_LENGTH = limits.max_header_bytes  # one line (LineReceiver's cap, 16 KiB by default)
        self.site.channel_opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Unregister from the site."""
        self._cancel_deadline()
        self.site.channel_closed(self)
        super().connectionLost(reason)

    # Deadlines are a timestamp per connection checked by the site's sweeper
    # (`DEADLINE_SWEEP` granularity), not a DelayedCall per request phase:
    # two timer heap operations per request cost ~10% of a small POST.

    def _cancel_deadline(self) -> None:
        self._deadline_at = 0.0
        self.site.armed.discard(self)

    def _start_deadline(self, seconds: float, what: str) -> None:
        self._deadline_at = self.site.now() + seconds
        self.site.armed.add(self)
        self._deadline_what = what
        self._deadline_seconds = seconds

    def check_deadline(self, now: float) -> None:
        """Called by the site's sweeper: cut the request off if its deadline passed."""
        if self._deadline_at and now >= self._deadline_at:
            self._deadline_at = 0.0
            self.site.armed.discard(self)
            self.reject(
                RequestTimeout(f"the request {self._deadline_what} did not arrive within {self._deadline_seconds:g}s")
            )

    def dataReceived(self, data: bytes) -> None:
        """Start the head deadline at a request's first byte."""
        if self._phase == "idle":
            self._phase = "head"
            self._start_deadline(self.site.limits.header_timeout, "head")
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        """Decide 413 from Content-Length, before any body byte is read."""
        self.body_limit = self.site.body_limit(self.request_path)
        if self.length is not None and self.length > self.body_limit:
            self.reject(PayloadTooLarge(f"Content-Length {self.length} exceeds the route's max_body of {self.body_limit} bytes"))
            return
        self._phase = "body"
        self._start_deadline(self.site.limits.body_timeout, "body")
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        """The request is complete: no deadline while it is answered."""
        self._cancel_deadline()
        self._phase = "handling"
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        """Back to idle (pipelined data replayed by Twisted starts the next head)."""
        self._phase = "idle"
        super().requestDone(request)

    def bad_request(self) -> None:
        """Twisted's bad-request path, as a problem document (431 for header limits)."""
        if self.received_header_size > self.totalHeadersSize or self.received_header_count > self.maxHeaders:
            self.reject(
                HeadersTooLarge(
                    f"at most {self.maxHeaders} header fields and {self.totalHeadersSize} bytes of request head"
                )
            )
        else:
            self.reject(BadRequest("malformed HTTP request"))

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header line alone over the head limit: 431, not a silent close."""
        self.reject(HeadersTooLarge(f"a request or header line exceeds {self.MAX_LENGTH} bytes"))

    def reject(self, problem: Problem) -> None:
        """Answer `problem` at once and close, ignoring whatever else arrives."""
        self._cancel_deadline()
        self.site.on_reject(problem)
        self.transport.write(_raw_problem(problem))
        self.dataReceived = self.rawDataReceived = lambda data: None  # type: ignore[method-assign]  # drop the rest
        self.loseConnection()

    def getHost(self) -> Any:
        """This end's address, read once per connection."""
        return self._host_address

    def getPeer(self) -> Any:
        """The client's address, read once per connection."""
        return self._peer_address

    @property
    def idle(self) -> bool:
        """No request is being received or answered on this connection."""
        return not self.requests


class _Refuse(Protocol):
    """Answers one problem document and closes (over the connection caps)."""

    transport: Any

    def __init__(self, problem: Problem) -> None:
        self._problem = problem

    def connectionMade(self) -> None:
        """Write the problem and close."""
        self.transport.write(_raw_problem(self._problem))
        self.transport.loseConnection()


class IngestSite(Site):
    """A Site without access log, with bounded bodies and connection tracking."""

    protocol = IngestChannel  # type: ignore[assignment]  # a plain HTTP/1.1 channel, no HTTP/2 negotiation
    requestFactory = IngestRequest

    def __init__(
        self,
        app: IngestApp,
        metrics: Metrics,
        idle_timeout: float,
        reactor: IReactorTime,
        limits: Optional[LimitsConfig] = None,
        sends: Optional[TurnSends] = None,
    ) -> None:
        super().__init__(app.resource(), timeout=idle_timeout, reactor=reactor)
        #: How answers are written: held to the end of the reactor turn once
        #: the reactor flushes it (`relayd.tap.RelayService`), else at once.
        self.sends = sends if sends is not None else TurnSends()
        self.limits = limits if limits is not None else LimitsConfig()
        self._per_peer: Dict[str, int] = {}
        self.app = app
        self.body_limit = app.body_limit
        self._clock = reactor
        self._date_second = -1
        self._date = b""
        self.channels: Set[IngestChannel] = set()
        #: Channels with a head/body deadline running: the sweeper visits
        #: only these, not every connection (10,000 SSE subscribers made
        #: each sweep a few-ms stall, four times a second).
        self.armed: Set[IngestChannel] = set()
        self._sweeper = LoopingCall(self._sweep_deadlines)
        self._sweeper.clock = reactor
        self._rejected = metrics.rejected

    def buildProtocol(self, addr: Any) -> Any:
        """A channel, or a refusal when over the connection caps."""
        peer = getattr(addr, "host", "")
        limits = self.limits
        if len(self.channels) >= limits.max_connections:
            problem = TooManyConnections(f"more than {limits.max_connections} connections", retry_after=1)
        elif self._per_peer.get(peer, 0) >= limits.max_connections_per_peer:
            problem = TooManyConnections(
                f"more than {limits.max_connections_per_peer} connections from {peer}", retry_after=1
            )
        else:
            channel = super().buildProtocol(addr)
            channel.peer = peer
            return channel
        self.on_reject(problem)
        return _Refuse(problem)

    def now(self) -> float:
        """The injected clock's time."""
        return float(self._clock.seconds())

    def stopFactory(self) -> None:
        """Stop the deadline sweeper with the port (it starts with the first connection)."""
        if self._sweeper.running:
            self._sweeper.stop()
        super().stopFactory()

    def _sweep_deadlines(self) -> None:
        now = self._clock.seconds()
        for channel in list(self.armed):
            channel.check_deadline(now)

    def channel_opened(self, channel: IngestChannel) -> None:
        """Track an open connection."""
        if not self._sweeper.running:
            self._sweeper.start(DEADLINE_SWEEP, now=False)
        self.channels.add(channel)
        self._per_peer[channel.peer] = self._per_peer.get(channel.peer, 0) + 1

    def channel_closed(self, channel: IngestChannel) -> None:
        """Forget a closed connection."""
        if channel in self.channels:
            self.channels.discard(channel)
            left = self._per_peer.get(channel.peer, 1) - 1
            if left:
                self._per_peer[channel.peer] = left
            else:
                self._per_peer.pop(channel.peer, None)

    def on_reject(self, problem: Problem) -> None:
        """Count a request refused at the HTTP layer."""
        self._rejected.labels(route="", reason=problem.reason).inc()

    def log(self, request: http.Request) -> None:
        """No access log: per-request logging costs a third of the request."""

    def date_header(self) -> bytes:
        """The Date header value, formatted once per second."""
        now = int(self._clock.seconds())
        if now != self._date_second:
            self._date_second = now
            self._date = datetimeToString(now)
        return self._date
