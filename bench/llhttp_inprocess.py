"""CPU per request of the raw twisted.web path without sockets: where llhttp can win at most.

The reference resource of bench/ref_twisted_web.py behind a Site, one
keep-alive connection on a StringTransport, fed wrk's request (bench/post.lua:
~200 B JSON POST, Host, Content-Length, Content-Type) N times.  Variants:

* ``twisted``  -- twisted.web's HTTPChannel (LineReceiver parsing);
* ``llhttp``   -- bench.llhttp_channel.LLHTTPChannel;
* ``noparse``  -- no parsing at all: the Request is built and fed by hand the
  way a parser would (requestHeaders, gotLength, handleContentChunk,
  requestReceived): the floor any parser can reach.

No reactor, no syscalls: the parser's share here is larger than in a real
server, so ``twisted/llhttp`` here is an upper bound of the raw-path gain.
Rounds alternate variants; the figure per variant is the minimum over rounds
of process CPU time per request (robust on a shared machine).

Usage: python bench/llhttp_inprocess.py [--rounds 7] [--requests 20000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.web.http import HTTPChannel  # noqa: E402

from bench.llhttp_channel import LLHTTPChannel  # noqa: E402
from bench.ref_twisted_web import Ingest, QuietSite  # noqa: E402

BODY = b'{"message":"this is a lead message ' + b"x" * 144 + b'","shop":"a23m07b23"}'
REQUEST = (
    b"POST /leads HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: %d\r\nContent-Type: application/json\r\n\r\n%s"
    % (len(BODY), BODY)
)


class _Sink(StringTransport):
    """A transport that forgets what is written (a StringTransport would grow for ever)."""

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, seq: object) -> None:
        pass


def _site() -> QuietSite:
    import functools

    from twisted.web import server

    return QuietSite(Ingest(), requestFactory=functools.partial(server.Request, parsePOSTFormSubmission=False), logPath=None)


def _channel(cls: type) -> HTTPChannel:
    site = _site()
    ch = cls()
    ch.factory = site
    ch.site = site
    ch.requestFactory = site.requestFactory
    ch.timeOut = None
    ch.makeConnection(_Sink())
    return ch


def run(variant: str, n: int) -> float:
    """CPU seconds per request."""
    if variant == "noparse":
        ch = _channel(HTTPChannel)
        t0 = time.process_time()
        for _ in range(n):
            req = ch.requestFactory(ch, len(ch.requests))
            ch.requests.append(req)
            h = req.requestHeaders
            h.addRawHeader(b"Host", b"127.0.0.1:8080")
            h.addRawHeader(b"Content-Length", b"%d" % len(BODY))
            h.addRawHeader(b"Content-Type", b"application/json")
            req.parseCookies()
            req.gotLength(len(BODY))
            req.handleContentChunk(BODY)
            ch._handlingRequest = True
            req.requestReceived(b"POST", b"/leads", b"HTTP/1.1")
        return (time.process_time() - t0) / n
    ch = _channel(LLHTTPChannel if variant == "llhttp" else HTTPChannel)
    data = REQUEST
    t0 = time.process_time()
    for _ in range(n):
        ch.dataReceived(data)
    return (time.process_time() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=20000)
    args = ap.parse_args()
    variants = ["twisted", "llhttp", "noparse"]
    best = {v: float("inf") for v in variants}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else list(reversed(variants)):
            best[v] = min(best[v], run(v, args.requests))
    for v in variants:
        print(f"{v:8s} {best[v] * 1e6:6.2f} µs CPU/request (min of {args.rounds} rounds)")
    print(f"twisted/llhttp {best['twisted'] / best['llhttp']:.3f}x; twisted/noparse {best['twisted'] / best['noparse']:.3f}x")


if __name__ == "__main__":
    main()
