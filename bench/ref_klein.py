"""Klein reference: the raw twisted.web reference's work, routed by Klein.

Same per-request work as bench/ref_twisted_web.py (read body, ujson.loads,
append to an in-memory list, answer {"status":"OK"}) and the same Site
settings (parsePOSTFormSubmission=False, no access log); the only difference
is that the request goes through Klein's resource, URL map and response
handling. req/s(ref_klein) / req/s(ref_twisted_web) is Klein's cost on this
machine; the py-spy profile of it shows where that cost goes.

Usage: python bench/ref_klein.py PORT
"""

import functools
import sys

import ujson
from klein import Klein
from twisted.internet import reactor
from twisted.web import server

OK = b'{"status":"OK"}'
_sink = []
app = Klein()


@app.route("/leads", methods=["POST"])
def leads(request):
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
    site = QuietSite(
        app.resource(),
        requestFactory=functools.partial(server.Request, parsePOSTFormSubmission=False),
        logPath=None,
    )
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)
    print(f"ref_klein listening on 127.0.0.1:{port} reactor={type(reactor).__name__}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
