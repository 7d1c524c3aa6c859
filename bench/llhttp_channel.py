"""HTTP/1.1 requests parsed by llhttp (``httptools``) under twisted.web: an experiment.

Issue 13, item 3: measured and LEFT OUT of relayd (the raw path gains
1.12-1.18x, the bar was 1.25x; known behaviour differences, e.g. Upgrade
requests, listed with the figures); figures and differences in docs/benchmarks.md
("llhttp under twisted.web's HTTPChannel").  Kept here, bench-only, so the
experiment can be re-run: ``bench/llhttp_ab.py`` (raw reference, via
``bench/ref_twisted_web.py --parser llhttp``), ``bench/llhttp_inprocess.py``
and ``bench/llhttp_relayd_ab.py`` (relayd, via ``bench/relayd_llhttp.py``).
httptools is in bench/requirements.txt, not a relayd dependency.

`LLHTTPChannel` is an `HTTPChannel` whose byte parsing (LineReceiver's
lines, `headerReceived`, the transfer decoders) is replaced by one
``HttpRequestParser.feed_data`` per read.  Everything above the parser is
twisted.web's own: `requestFactory(self, queued)`, ``requestHeaders``
keyed by canonical name (as `addRawHeader` would), `allHeadersReceived` (``gotLength``, Expect:
100-continue, persistence), ``handleContentChunk``, `allContentReceived`
(``requestReceived``), `requestDone`, the idle timeout and producer plumbing.
So Klein, `Request` and subclasses overriding those hooks keep working.

Pipelining: twisted.web hands a connection's requests to the application
one at a time.  llhttp cannot be stopped in the middle of a buffer (httptools
exposes no pause), so the parser events of a request that arrive while an
earlier one is being answered are queued (`_pending`) and replayed, in
order, when it is done; bytes that arrive while a request is being answered
are buffered unparsed, as twisted.web does.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Optional, Tuple

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import InvalidHeaderName, _nameEncoder

_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
# twisted.web's request-target check (`_parseRequestLine`): bytes 33..176 only.
_TARGET_BYTES = bytes(range(33, 177))
_NO_CTL = b"\x00\r\n"


class _Stop(Exception):
    """Raised from a parser callback to abandon the rest of a buffer (the request was answered)."""


class LLHTTPChannel(HTTPChannel):
    """An HTTPChannel driven by llhttp instead of LineReceiver (see the module docstring)."""

    _parser: Any = None
    _url = b""
    _in_head = False  # a request has begun and its headers are not complete
    _head_fed = 0  # bytes fed while a head was incomplete (cap for a head that never ends)
    _head_fresh = False  # the incomplete head began in the buffer being parsed
    _busy = False  # inside feed_data
    _resuming = False
    _replaying = False  # running a queued parser event

    def connectionMade(self) -> None:
        """Create the parser with the connection."""
        super().connectionMade()
        self._parser = HttpRequestParser(self)
        self._pending: Deque[Tuple[Callable[..., None], Tuple[Any, ...]]] = deque()

    # -- bytes in ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Feed the parser, or buffer while a request is being answered (twisted.web's rule)."""
        self.resetTimeout()
        if self._handlingRequest or self._pending:
            # HTTPChannel.rawDataReceived's buffering and back-pressure.
            self._dataBuffer.append(data)
            if sum(map(len, self._dataBuffer)) > self._optimisticEagerReadSize and not self._waitingForTransport:
                self._networkProducer.pauseProducing()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        if self.transport.disconnecting:
            return
        self._busy = True
        try:
            self._parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as e:
            # httptools turns an exception in a callback into a parser error
            # whose __context__ it is.
            cause = e.__context__
            if isinstance(cause, _Stop) or self.transport.disconnecting:
                return  # the channel answered and is closing: drop the rest
            if cause is not None:
                raise cause from None  # a bug above the parser: as twisted.web, let the reactor log it
            # Malformed framing; or ``Upgrade``, after which llhttp stops
            # parsing: twisted.web has no upgrades for relayd either.
            self._queue_or_run(self._bad, ())
            return
        finally:
            self._busy = False
        if self._in_head:
            if self._head_fresh:
                # Begun in this buffer, at an offset llhttp does not tell:
                # counted from the next read on (a read is at most 64 KiB).
                self._head_fresh = False
                return
            self._head_fed += len(data)
            if self._head_fed > self.MAX_LENGTH + 2 and self._head_fed > self.totalHeadersSize:
                self._queue_or_run(self.lineLengthExceeded, (data,))

    def _queue_or_run(self, handler: Callable[..., None], args: Tuple[Any, ...]) -> None:
        if self._handlingRequest or self._pending:
            self._pending.append((handler, args))
        else:
            handler(*args)

    # -- llhttp callbacks (names fixed by httptools) --------------------------
    #
    # Each one first queues itself if an earlier request is being answered
    # (`_replaying`: it is being run from that queue), and stops the parser
    # if the channel has answered and is closing (as LineReceiver's loop
    # stops on ``transport.disconnecting``).

    def on_message_begin(self) -> None:
        """llhttp: a request starts (twisted.web's first `lineReceived`)."""
        if (self._handlingRequest or self._pending) and not self._replaying:
            self._pending.append((self.on_message_begin, ()))
            return
        if self.transport.disconnecting:
            raise _Stop()
        if not self.persistent:
            # twisted.web drops whatever a client sends after a non-persistent request.
            self.dataReceived = lambda data: None  # type: ignore[method-assign]
            self._pending.clear()
            if self._busy:
                raise _Stop()
            return
        self.requests.append(self.requestFactory(self, len(self.requests)))
        self._url = b""
        self._in_head = True
        self._head_fresh = True
        self._head_fed = 0

    def on_url(self, url: bytes) -> None:
        """llhttp: (a piece of) the request target."""
        if (self._handlingRequest or self._pending) and not self._replaying:
            self._pending.append((self.on_url, (url,)))
            return
        if self.transport.disconnecting:
            raise _Stop()
        url = self._url = self._url + url
        if len(url) > self.MAX_LENGTH:
            self.lineLengthExceeded(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """llhttp: one complete header field (twisted.web's `headerReceived`)."""
        if (self._handlingRequest or self._pending) and not self._replaying:
            self._pending.append((self.on_header, (name, value)))
            return
        if self.transport.disconnecting:
            raise _Stop()
        value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace
        size = self._receivedHeaderSize = self._receivedHeaderSize + len(name) + len(value) + 2
        if size > self.totalHeadersSize:
            self._respondToBadRequestAndDisconnect()
            return
        try:
            name = _nameEncoder.encode(name)
        except InvalidHeaderName:
            self._respondToBadRequestAndDisconnect()
            return
        if len(value.translate(None, _NO_CTL)) != len(value):
            self._respondToBadRequestAndDisconnect()
            return
        if (name == b"Content-Length" or name == b"Transfer-Encoding") and not self._framing(name, value):
            return
        # Headers.addRawHeader would canonicalise the name again and split
        # the value on line breaks, which llhttp has already refused.
        self.requests[-1].requestHeaders._rawHeaders.setdefault(name, []).append(value)
        count = self._receivedHeaderCount = self._receivedHeaderCount + 1
        if count > self.maxHeaders:
            self._respondToBadRequestAndDisconnect()

    def _framing(self, name: bytes, value: bytes) -> bool:
        """twisted.web's `_maybeChooseTransferDecoder` rules (llhttp frames the body itself)."""
        if name == b"Content-Length":
            if not value.isdigit():
                return self._failChooseTransferDecoder()
            length: Optional[int] = int(value)
        elif value.lower() == b"chunked":
            length = None
        elif value.lower() == b"identity":
            return True
        else:
            return self._failChooseTransferDecoder()
        if self._transferDecoder is not None:
            return self._failChooseTransferDecoder()
        self.length = length
        self._transferDecoder = True  # marks "framing chosen" (llhttp decodes)
        return True

    def on_headers_complete(self) -> None:
        """llhttp: end of the head (twisted.web's empty line: `allHeadersReceived`)."""
        parser = self._parser
        if (self._handlingRequest or self._pending) and not self._replaying:
            self._pending.append((self._head_done, (parser.get_method(), parser.get_http_version())))
            return
        if self.transport.disconnecting:
            raise _Stop()
        self._head_done(parser.get_method(), parser.get_http_version())

    def _head_done(self, method: bytes, version: str) -> None:
        self._in_head = False
        url = self._url
        http_version = _VERSIONS.get(version)
        if http_version is None or not url or url.translate(None, _TARGET_BYTES):
            self._respondToBadRequestAndDisconnect()
            return
        size = self._receivedHeaderSize = self._receivedHeaderSize + len(method) + len(url) + 10
        if size > self.totalHeadersSize:
            self._respondToBadRequestAndDisconnect()
            return
        self._command = method
        self._path = url
        self._version = http_version
        self.allHeadersReceived()

    def on_body(self, body: bytes) -> None:
        """llhttp: body bytes, chunked framing removed (the transfer decoder's callback)."""
        if (self._handlingRequest or self._pending) and not self._replaying:
            self._pending.append((self.on_body, (body,)))
            return
        if self.transport.disconnecting:
            raise _Stop()
        self.requests[-1].handleContentChunk(body)

    def on_message_complete(self) -> None:
        """llhttp: the request is complete: `allContentReceived` hands it to the Request."""
        if (self._handlingRequest or self._pending) and not self._replaying:
            self._pending.append((self.on_message_complete, ()))
            return
        if self.transport.disconnecting:
            raise _Stop()
        self.allContentReceived()
        self.line_mode = 1  # allContentReceived's setRawMode means nothing here

    def _bad(self) -> None:
        self._respondToBadRequestAndDisconnect()

    # -- requests done -------------------------------------------------------

    def requestDone(self, request: Any) -> None:
        """twisted.web's `requestDone`, resuming this channel's own queue instead of LineReceiver."""
        if request != self.requests[0]:
            raise TypeError
        del self.requests[0]
        if not self._waitingForTransport:
            self._networkProducer.resumeProducing()
        if self.persistent:
            self._handlingRequest = False
            if self._savedTimeOut:
                self.setTimeout(self._savedTimeOut)
            self._resume()
        else:
            self.loseConnection()

    def _resume(self) -> None:
        """Replay queued events, then buffered bytes, until a request is being answered again."""
        if self._resuming:
            return  # the loop below, further up the stack, carries on
        self._resuming = True
        try:
            while not self._handlingRequest and not self.transport.disconnecting:
                if self._pending:
                    handler, args = self._pending.popleft()
                    self._replaying = True
                    try:
                        handler(*args)
                    finally:
                        self._replaying = False
                elif self._dataBuffer and not self._busy:
                    data = b"".join(self._dataBuffer)
                    self._dataBuffer = []
                    self._feed(data)
                else:
                    break
        finally:
            self._resuming = False


