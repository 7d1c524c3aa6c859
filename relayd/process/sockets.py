# -*- test-case-name: tests.test_workers -*-
"""The ingest sockets the supervisor binds once and every worker inherits.

One ``SO_REUSEPORT`` socket per worker slot (the kernel spreads new
connections over the workers' own accept queues), or the one
systemd-activated socket that all workers accept from.  The sockets live as
long as the supervisor: a reload's new workers adopt the same ones before
the old workers stop, so no queued connection is ever reset (see
relayd/process/supervisor.py).
"""

from __future__ import annotations

import socket
from typing import List, Optional

from relayd.listener import bind_reuseport, systemd_fd


class IngestSockets:
    """The listening sockets for ``[server] listen``, and which worker slot gets which."""

    def __init__(self, listen: str) -> None:
        self._listen = listen
        self._sockets: List[socket.socket] = []
        self._shared_fd: Optional[int] = None  # systemd-activated socket
        self.family: int = socket.AF_INET

    def bind(self, count: int) -> None:
        """Have a socket for each of `count` slots (binds the missing ones; raises OSError/ValueError)."""
        if self._listen.startswith("systemd:"):
            if self._shared_fd is None:
                self._shared_fd, self.family = systemd_fd(self._listen)
            return
        while len(self._sockets) < count:
            s = bind_reuseport(self._listen)
            self.family = s.family
            self._sockets.append(s)

    def fds_for(self, slot: int, workers: int) -> List[int]:
        """The descriptors worker `slot` of `workers` accepts from."""
        if self._shared_fd is not None:
            return [self._shared_fd]
        # Slots beyond the worker count (fewer workers after a reload) stay
        # open and are served by a live worker: closing them would reset
        # their queued connections.
        return [s.fileno() for i, s in enumerate(self._sockets) if i % workers == slot]

    def close(self) -> None:
        """Close our copies (the port closes when the last worker closes its own)."""
        for s in self._sockets:
            s.close()
        self._sockets = []
