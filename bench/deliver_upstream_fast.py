"""A minimal keep-alive HTTP/1.1 upstream for bench/deliver_bench.py: answers 200 at once.

Plain asyncio so that the upstream costs far less than either consumer
measured against it.  ``GET /stats`` answers the request count and the
latency samples (now - the body's ``t0``) collected since the last
``GET /reset``.  Usage: ``python bench/deliver_upstream_fast.py PORT``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class State:
    """Counters shared by all connections."""

    count = 0
    latencies: list = []


class Handler(asyncio.Protocol):
    """Parses pipelined/keep-alive requests with Content-Length bodies."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start with an empty buffer."""
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        """Answer every complete request in the buffer."""
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = 0
            i = head.find(b"content-length:")
            if i >= 0:
                length = int(head[i + 15 : head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None])
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            if head.startswith(b"get /stats"):
                data = json.dumps({"count": State.count, "latencies": State.latencies}).encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))  # type: ignore[attr-defined]
                continue
            if head.startswith(b"get /reset"):
                State.count = 0
                State.latencies = []
                self.transport.write(OK)  # type: ignore[attr-defined]
                continue
            State.count += 1
            if b'"t0"' in body:
                try:
                    State.latencies.append(time.time() - json.loads(body)["t0"])
                except (ValueError, KeyError):
                    pass
            self.transport.write(OK)  # type: ignore[attr-defined]


async def main(port: int) -> None:
    """Serve forever."""
    server = await asyncio.get_running_loop().create_server(Handler, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
