"""Raw twisted.web reference: the Python ceiling for relayd (no Redis).

One plain ``Resource`` whose ``render_POST`` reads the body, parses it with
ujson, appends the raw bytes to an in-memory list (cleared past 1M items) and
answers ``{"status":"OK"}``. The Site is configured the way a fast Twisted
service should be:

* ``parsePOSTFormSubmission=False`` so twisted.web does not run every body's
  Content-Type through the form/multipart parser;
* no access log (``Site.log`` is a no-op; ``logPath=None`` alone would still
  log to the global twisted log file).

``--parser llhttp`` swaps twisted.web's LineReceiver parsing for llhttp
(``bench.llhttp_channel.LLHTTPChannel``, issue 13 item 3); everything
else (Site, Request, the HTTP/2-negotiation wrapper) stays the same.

Usage: python bench/ref_twisted_web.py PORT [--parser twisted|llhttp]
"""

import functools
import sys

import ujson
from twisted.internet import reactor
from twisted.web import resource, server

OK = b'{"status":"OK"}'
_sink = []


class Ingest(resource.Resource):
    isLeaf = True

    def render_POST(self, request):
        body = request.content.read()
        ujson.loads(body)
        _sink.append(body)
        if len(_sink) > 1_000_000:
            _sink.clear()
        request.setHeader(b"content-type", b"application/json")
        return OK


class QuietSite(server.Site):
    def log(self, request):  # no access log at all
        pass


def main():
    port = int(sys.argv[1])
    parser = "twisted"
    if sys.argv[2:4] and sys.argv[2] == "--parser":
        parser = sys.argv[3]
    site = QuietSite(
        Ingest(),
        requestFactory=functools.partial(server.Request, parsePOSTFormSubmission=False),
        logPath=None,
    )
    if parser == "llhttp":
        import os

        from twisted.web.http import _GenericHTTPChannelProtocol

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bench.llhttp_channel import LLHTTPChannel

        site.protocol = lambda: _GenericHTTPChannelProtocol(LLHTTPChannel())
    elif parser != "twisted":
        raise SystemExit(f"unknown parser {parser!r}")
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)
    print(f"ref_twisted_web listening on 127.0.0.1:{port} reactor={type(reactor).__name__} parser={parser}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
