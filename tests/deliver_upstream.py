"""A real Twisted HTTP upstream for the delivery tests, run as its own process.

``python tests/deliver_upstream.py PORT LOGFILE`` serves every path; what it
answers depends on the message: the JSON body's ``"b"`` field names a
behaviour (below), counted per ``Idempotency-Key`` so "fail, then succeed"
works across retries.  Every request is appended to LOGFILE as one JSON line
(arrival time, headers, body, status answered), and every connection opened
or closed as ``{"event": "conn", "open": N}``: the tests read the file.

Behaviours:
``ok`` 200 -- ``fail-once`` 500 then 200 -- ``retry-after`` 429 with
``Retry-After: 1`` then 200 -- ``bad`` 400 -- ``always-500`` -- ``slow-once``
headers and half a body, then nothing (past the deliver's timeout), then
200 -- ``close`` 200 and the connection closed by the server shortly after
(a keep-alive closing under the client) -- ``garbage-once`` non-HTTP bytes
and a close, then 200.  Anything else: 200.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

HEADERS = (
    b"content-type", b"idempotency-key", b"webhook-id", b"webhook-timestamp", b"webhook-signature",
    b"authorization", b"user-agent",
)


class Upstream(Resource):
    """Answers by behaviour; logs every request."""

    isLeaf = True

    def __init__(self, log: Any) -> None:
        super().__init__()
        self._log = log
        self._seen: Dict[str, int] = {}

    def write(self, entry: Dict[str, Any]) -> None:
        """One JSON line, flushed (the test reads while we run)."""
        self._log.write(json.dumps(entry) + "\n")
        self._log.flush()

    def render(self, request: Any) -> Any:
        """Dispatch on the body's "b" field."""
        body = request.content.read()
        try:
            behaviour = json.loads(body).get("b", "ok")
        except Exception:
            behaviour = "ok"
        key = (request.getHeader(b"idempotency-key") or b"").decode()
        seen = self._seen.get(key, 0)
        self._seen[key] = seen + 1
        status = 200
        if behaviour == "fail-once" and seen == 0:
            status = 500
        elif behaviour == "retry-after" and seen == 0:
            status = 429
            request.setHeader(b"Retry-After", b"1")
        elif behaviour == "bad":
            status = 400
        elif behaviour == "always-500":
            status = 500
        entry = {
            "t": time.time(),
            "method": request.method.decode(),
            "path": request.path.decode(),
            "headers": {h.decode(): (request.getHeader(h) or b"").decode() for h in HEADERS},
            "body": body.decode("latin-1"),
            "behaviour": behaviour,
            "attempt": seen + 1,
            "status": status,
        }
        if behaviour == "slow-once" and seen == 0:
            entry["status"] = "slow"
            self.write(entry)
            request.setHeader(b"Content-Length", b"100")
            request.write(b"x" * 10)
            return NOT_DONE_YET
        if behaviour == "garbage-once" and seen == 0:
            entry["status"] = "garbage"
            self.write(entry)
            request.channel.transport.write(b"\x00\x01 this is not HTTP\r\n\r\n")
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        self.write(entry)
        request.setResponseCode(status)
        if behaviour == "close":
            transport = request.channel.transport
            reactor.callLater(0.05, transport.loseConnection)
        return b'{"ok": true}' if status == 200 else b'{"error": "nope"}'


class CountingSite(Site):
    """Logs the number of open connections at each connect and close."""

    def __init__(self, resource: Upstream) -> None:
        super().__init__(resource)
        self.open = 0
        self.upstream = resource

    def buildProtocol(self, addr: Any) -> Any:
        """Count the connection; uncount it when it closes."""
        proto = super().buildProtocol(addr)
        self.open += 1
        self.upstream.write({"event": "conn", "open": self.open, "t": time.time()})
        lost = proto.connectionLost

        def connection_lost(reason: Any) -> None:
            self.open -= 1
            self.upstream.write({"event": "close", "open": self.open, "t": time.time()})
            lost(reason)

        proto.connectionLost = connection_lost
        return proto


def main() -> None:
    """Serve until killed."""
    port, path = int(sys.argv[1]), sys.argv[2]
    log = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life
    site = CountingSite(Upstream(log))
    site.log = lambda request: None
    reactor.listenTCP(port, site, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
