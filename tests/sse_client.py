"""A Server-Sent Events client for tests: a raw socket, a reader thread, parsed events.

Raw rather than http.client so that a test can set the socket's receive
buffer (a subscriber that never reads), see the response head as sent,
and decode the chunked body incrementally.
"""

from __future__ import annotations

import socket
import threading
from typing import Dict, List, Optional, Tuple


class SSEClient:
    """``GET path`` with ``Accept: text/event-stream``; events in `events` as ``(id, data)``."""

    def __init__(
        self,
        port: int,
        path: str,
        last_event_id: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
        read: bool = True,
        rcvbuf: Optional[int] = None,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(30.0)
        self.sock.connect(("127.0.0.1", port))
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Accept: text/event-stream"]
        if last_event_id is not None:
            lines.append(f"Last-Event-ID: {last_event_id}")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.status: Optional[int] = None
        self.head = b""
        self.body = b""  # a non-stream response's body (problems)
        self.events: List[Tuple[str, str]] = []
        self.comments: List[str] = []
        self.retry: Optional[int] = None
        self.closed = False
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        if read:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def ids(self) -> List[str]:
        """Ids of the events received so far."""
        with self._lock:
            return [i for i, _ in self.events]

    def data(self) -> List[str]:
        """Data of the events received so far."""
        with self._lock:
            return [d for _, d in self.events]

    def close(self) -> None:
        """Drop the connection."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)
            self.head = head
            self.status = int(head.split(b" ", 2)[1])
            chunked = b"transfer-encoding: chunked" in head.lower()
            if self.status != 200:
                self.body = buf
                length = None
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while length is None or len(self.body) < length:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        return
                    self.body += chunk
                return
            # Linear-time parsing (bytearrays, consumed from the front once per
            # read): a slow client would be cut as a slow subscriber.
            raw = bytearray(buf)
            text = bytearray()
            while True:
                if chunked:
                    pos = 0
                    while True:
                        end = raw.find(b"\r\n", pos)
                        if end < 0:
                            break
                        size = int(bytes(raw[pos:end]).split(b";")[0], 16)
                        if len(raw) < end + 2 + size + 2:
                            break
                        text += raw[end + 2 : end + 2 + size]
                        pos = end + 4 + size
                        if size == 0:
                            return
                    del raw[:pos]
                else:
                    text += raw
                    del raw[:]
                start = 0
                while True:
                    i = text.find(b"\n\n", start)
                    if i < 0:
                        break
                    self._block(bytes(text[start:i]).decode("utf-8"))
                    start = i + 2
                del text[:start]
                chunk = self.sock.recv(262144)
                if not chunk:
                    return
                raw += chunk
        except OSError:
            return
        finally:
            self.closed = True

    def _block(self, block: str) -> None:
        event_id: Optional[str] = None
        data: List[str] = []
        for line in block.split("\n"):
            if line.startswith(":"):
                with self._lock:
                    self.comments.append(line[1:].strip())
            elif line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line.startswith("retry: "):
                self.retry = int(line[7:])
        if event_id is not None:
            with self._lock:
                self.events.append((event_id, "\n".join(data)))
