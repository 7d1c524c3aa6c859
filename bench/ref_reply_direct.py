"""Reference for request/reply: the echo worker's logic called in-process (no Redis).

    python bench/ref_reply_direct.py PORT

A Klein app (relayd's HTTP stack: Klein on twisted.web, same Site settings as
bench/ref_klein.py) that does per request what relayd + the echo worker do
minus the trip through Redis: parse the JSON body, build an envelope,
call `examples.reply_worker.reply_for(envelope, "echo")`, parse that reply
and answer with its status, headers and body.  latency(relayd) -
latency(this) is what relayd's queueing through Redis adds.
"""

import functools
import os
import sys
import time

import ujson
from klein import Klein
from twisted.internet import reactor
from twisted.web import server

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from reply_worker import reply_for  # noqa: E402

app = Klein()


@app.route("/quote", methods=["POST"])
def quote(request):
    envelope = {
        "id": os.urandom(8).hex(),
        "ts": time.time(),
        "route": "/quote",
        "content_type": "application/json",
        "body": ujson.loads(request.content.read()),
    }
    reply = ujson.loads(reply_for(envelope, "echo"))
    request.setResponseCode(reply.get("status", 200))
    for name, value in reply.get("headers", {}).items():
        request.setHeader(name.encode(), value.encode())
    body = ujson.dumps(reply["body"], ensure_ascii=False, escape_forward_slashes=False).encode()
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


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
    print(f"ref_reply_direct listening on 127.0.0.1:{port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
