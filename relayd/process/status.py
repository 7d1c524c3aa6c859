# -*- test-case-name: tests.test_status -*-
"""The status pipe: what a worker tells its supervisor, both ends in one place.

A worker writes one JSON object per line to the descriptor the supervisor
gave it (`STATUS_FD`); the supervisor reads them (`StatusReader`).  Three
messages:

``{"ready": true, "pid": 123, "spool": "/var/spool/relayd/worker-0"}``
    `Ready`: ingest listens and spool recovery is done.
``{"hb": 1700000000.0}``
    `Heartbeat`: every `HEARTBEAT_INTERVAL`; the supervisor restarts a worker
    silent for ``[server] worker_timeout`` and pings systemd's watchdog only
    while every heartbeat is fresh.
``{"final_metrics": "<prometheus text>"}``
    `FinalMetrics`: the worker's counters as it leaves, so the merged
    ``/metrics`` keeps them (a scrape could be seconds old).

JSON lines keep the pipe readable with ``strace``; a line that does not
decode is skipped (a worker never writes one, but the supervisor must not
die of it).
"""

from __future__ import annotations

import errno
import json
import os
from typing import List, Optional, Union

import attrs

#: The worker's descriptor for status lines (0-2 are stdio; 4+ are listening sockets).
STATUS_FD = 3
#: Seconds between heartbeats.
HEARTBEAT_INTERVAL = 1.0


@attrs.frozen
class Ready:
    """The worker listens and has recovered its spool."""

    pid: int
    spool: str


@attrs.frozen
class Heartbeat:
    """The worker's reactor still turns (`at` is its clock's time)."""

    at: float


@attrs.frozen
class FinalMetrics:
    """The worker's counters and histograms as it exits (Prometheus text)."""

    text: str


StatusMessage = Union[Ready, Heartbeat, FinalMetrics]


def encode(message: StatusMessage) -> bytes:
    """One message as one line (with its ``\\n``)."""
    fields: dict[str, object]
    if isinstance(message, Ready):
        fields = {"ready": True, "pid": message.pid, "spool": message.spool}
    elif isinstance(message, Heartbeat):
        fields = {"hb": message.at}
    else:
        fields = {"final_metrics": message.text}
    return json.dumps(fields).encode("utf-8") + b"\n"


def decode(line: bytes) -> Optional[StatusMessage]:
    """One line (without its ``\\n``) -> a message, or None if it is not one."""
    try:
        fields = json.loads(line)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    if fields.get("ready") is True and isinstance(fields.get("pid"), int) and isinstance(fields.get("spool"), str):
        return Ready(pid=fields["pid"], spool=fields["spool"])
    if isinstance(fields.get("hb"), (int, float)) and not isinstance(fields["hb"], bool):
        return Heartbeat(at=float(fields["hb"]))
    if isinstance(fields.get("final_metrics"), str):
        return FinalMetrics(text=fields["final_metrics"])
    return None


class StatusReader:
    """The supervisor's end: bytes as they arrive -> complete messages."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> List[StatusMessage]:
        """The messages completed by `data` (a partial last line waits for the rest)."""
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [m for m in map(decode, lines) if m is not None]


class StatusWriter:
    """The worker's end: one line per message; a gone supervisor is not an error."""

    def __init__(self, fd: Optional[int]) -> None:
        self._fd = fd

    def send(self, message: StatusMessage) -> None:
        """Write `message` (dropped when there is no pipe, or it is full or closed)."""
        if self._fd is None:
            return
        try:
            os.write(self._fd, encode(message))
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.EBADF):
                self._fd = None
            # EAGAIN: a busy supervisor misses one heartbeat; the next one counts
