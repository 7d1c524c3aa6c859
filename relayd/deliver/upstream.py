"""The upstream HTTP client of one deliver: Twisted's Agent on a persistent, bounded pool.

(Not treq's `HTTPClient`: it parses the URL with hyperlink + idna on every
request, measured at ~40 % of relayd's CPU per delivery; the URL here is
fixed, so the plain Agent with a ready bytes URL does the same job.)

- One `HTTPConnectionPool` per deliver, persistent, keeping at most
  `concurrency` idle connections per host (and the service never has more
  than `concurrency` requests out, so never more connections than that).
  Idle connections close after `IDLE_TIMEOUT`, below common upstream
  keep-alive timeouts (Node.js and Apache: 5 s), so relayd closes first and
  rarely writes into a connection the upstream is closing.
- ``timeout`` covers the whole exchange, response body included (treq's own
  timeout stops at the headers): one timer cancels whichever step is running,
  and cancelling a body read aborts the connection.
- Twisted's Agent does not retry a POST that failed on a stale keep-alive
  connection (Twisted #7843: only idempotent methods are retried).  Every
  request carries ``Idempotency-Key``, so `Upstream.send` retries such a
  failure (no response at all) once, on a fresh connection, within the timeout.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web._newclient import RequestTransmissionFailed
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from relayd.deliver.outcome import Outcome, classify_error, classify_status, parse_retry_after

#: Seconds an idle pooled connection is kept: below Node.js's and Apache's 5 s keep-alive.
IDLE_TIMEOUT = 4.0
#: Bytes of a response body kept (the rest is read and dropped): memory stays bounded.
MAX_BODY = 64 * 1024
#: Characters of an error answer's body kept in the dead-letter detail.
DETAIL_BODY_CHARS = 200
USER_AGENT = b"relayd-deliver"


@attrs.frozen
class Attempt:
    """One attempt's verdict and how long the exchange took."""

    outcome: Outcome
    seconds: float


@implementer(IAgentEndpointFactory)
class FixedEndpoints:
    """One endpoint per (scheme, host, port), built once.

    Agent's own factory builds a `HostnameEndpoint` per request, IDNA-encoding
    the host each time (~10 % of the CPU of a delivery); a deliver talks to
    one URL, so its endpoint is reused.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()
        self._cache: Dict[Tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        """The (cached) endpoint of `uri`: TCP, or TLS over TCP for https."""
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            host = uri.host.decode("ascii").strip("[]")
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
            self._cache[key] = endpoint
        return endpoint


class BodyReader(Protocol):
    """Reads a response body, keeping at most `limit` bytes (the rest is discarded).

    Not `twisted.web.client.readBody`: cancelling its Deferred aborts the
    connection, and the connectionLost that follows errbacks the same,
    already cancelled Deferred (AlreadyCalledError logged as critical).
    Here a cancel stops the transport and the later connectionLost is ignored.
    """

    def __init__(self, limit: int) -> None:
        self.deferred: Deferred = Deferred(self._cancel)
        self._parts: list = []
        self._room = limit

    def dataReceived(self, data: bytes) -> None:
        """Keep the first `limit` bytes."""
        if self._room > 0:
            self._parts.append(data[: self._room])
            self._room -= len(data)

    def connectionLost(self, reason: Any = None) -> None:
        """The body ended: whole (or ended by a close without a length: also whole), or cut short."""
        if self.deferred.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.deferred.callback(b"".join(self._parts))
        else:
            self.deferred.errback(reason)

    def _cancel(self, _: Deferred) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]  # an IPushProducer here; closes the connection; its connectionLost is ignored


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go (no cooperator task per request)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred:
        """Write the whole body."""
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the body is written at once."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


class Upstream:
    """Sends requests to one URL; answers `Attempt`s, never raises."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        url: str,
        method: str,
        headers: Tuple[Tuple[str, str], ...],
        concurrency: int,
        timeout: float,
    ) -> None:
        self._reactor = reactor
        self._url = url.encode("utf-8")
        self._method = method.encode("ascii")
        self._static = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        self._timeout = timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = concurrency
        self.pool.cachedConnectionTimeout = IDLE_TIMEOUT  # type: ignore[assignment]  # a float works
        self.pool.retryAutomatically = False  # our own retry below covers every method
        self._agent = Agent.usingEndpointFactory(reactor, FixedEndpoints(reactor, min(timeout, 30.0)), pool=self.pool)

    def _headers(self, message_id: str, content_type: str, extra: Dict[bytes, bytes]) -> Headers:
        h = Headers()
        for k, v in self._static:
            h.addRawHeader(k, v)
        h.setRawHeaders(b"Content-Type", [content_type.encode("latin-1", "replace")])
        h.setRawHeaders(b"Idempotency-Key", [message_id.encode("utf-8")])
        h.setRawHeaders(b"User-Agent", [USER_AGENT])
        for k, v in extra.items():
            h.setRawHeaders(k, [v])
        return h

    async def send(self, message_id: str, body: bytes, content_type: str, extra: Dict[bytes, bytes]) -> Attempt:
        """One delivery attempt (with at most one stale-connection retry)."""
        start = self._reactor.seconds()
        headers = self._headers(message_id, content_type, extra)
        state: Dict[str, Any] = {"current": None, "timed_out": False}

        def expire() -> None:
            state["timed_out"] = True
            if state["current"] is not None:
                state["current"].cancel()

        timer = self._reactor.callLater(self._timeout, expire)
        try:
            outcome = await self._exchange(headers, body, state)
        finally:
            if timer.active():
                timer.cancel()
        return Attempt(outcome, self._reactor.seconds() - start)

    async def _exchange(self, headers: Headers, body: bytes, state: Dict[str, Any]) -> Outcome:
        response = None
        for attempt in (1, 2):
            d = self._agent.request(self._method, self._url, headers, BytesProducer(body))
            state["current"] = d
            try:
                response = await d
                break
            except (ResponseNeverReceived, RequestTransmissionFailed) as e:
                if state["timed_out"]:
                    return classify_error(f"timeout after {self._timeout:g} s")
                if attempt == 2:
                    return classify_error(f"no response: {_reasons(e)}")
            except CancelledError:
                if state["timed_out"]:
                    return classify_error(f"timeout after {self._timeout:g} s")
                raise  # cancelled by a stop, not by the timeout
            except Exception as e:  # refused, DNS, TLS, parse errors: all retryable
                if state["timed_out"]:
                    return classify_error(f"timeout after {self._timeout:g} s")
                return classify_error(f"{type(e).__name__}: {e}"[:300])
        assert response is not None
        reader = BodyReader(MAX_BODY)
        response.deliverBody(reader)
        body_d: Any = reader.deferred
        state["current"] = body_d
        try:
            data: Optional[bytes] = await body_d
        except CancelledError:
            if state["timed_out"]:
                return classify_error(f"timeout after {self._timeout:g} s (reading the body)")
            raise
        except Exception as e:  # a body cut short: the answer is incomplete
            if state["timed_out"]:
                return classify_error(f"timeout after {self._timeout:g} s (reading the body)")
            data = None
            if 200 <= response.code < 300:
                return classify_error(f"response body failed: {type(e).__name__}")
        retry_after = parse_retry_after(
            (response.headers.getRawHeaders(b"Retry-After") or [None])[0], self._reactor.seconds()
        )
        hint = ""
        if data and not 200 <= response.code < 300:
            hint = data[:DETAIL_BODY_CHARS].decode("utf-8", "replace").replace("\n", " ")
        return classify_status(response.code, retry_after, hint)

    def close(self) -> Any:
        """Close the pooled connections (at stop)."""
        return self.pool.closeCachedConnections()


def _reasons(e: Exception) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return ", ".join(type(r.value).__name__ for r in reasons)
    return type(e).__name__
