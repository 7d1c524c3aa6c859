# -*- test-case-name: tests.test_workers -*-
"""Heartbeats: a worker whose reactor stops turning is killed (and so restarted).

Each worker writes a heartbeat every second (relayd/process/status.py).
`HeartbeatMonitor` checks them every `HEARTBEAT_CHECK_INTERVAL`: one silent
for longer than ``worker_timeout`` gets SIGKILL (a blocked reactor would
not act on SIGTERM), and the pool restarts it.  `healthy` is what the
supervisor's systemd watchdog asks before each ping.
"""

from __future__ import annotations

import signal

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relayd.process.pool import WorkerPool

#: Seconds between checks of the workers' heartbeats.
HEARTBEAT_CHECK_INTERVAL = 1.0
#: A worker whose heartbeat (every second) is older than this is killed and restarted.
DEFAULT_WORKER_TIMEOUT = 30.0


class HeartbeatMonitor:
    """Kills workers whose heartbeat is older than `timeout`."""

    _log = Logger(namespace="relayd.process.supervisor")

    def __init__(self, reactor: IReactorTime, pool: WorkerPool, timeout: float = DEFAULT_WORKER_TIMEOUT) -> None:
        self._clock = reactor
        self._pool = pool
        self._timeout = timeout
        self._check = LoopingCall(self.check)
        self._check.clock = reactor

    def start(self) -> None:
        """Check every `HEARTBEAT_CHECK_INTERVAL` from now on."""
        self._check.start(HEARTBEAT_CHECK_INTERVAL, now=False)

    def stop(self) -> None:
        """Stop checking."""
        if self._check.running:
            self._check.stop()

    def check(self) -> None:
        """SIGKILL every running, non-retiring worker silent for longer than the timeout."""
        now = self._clock.seconds()
        for handle in list(self._pool.handles.values()):
            if handle.retiring or handle.exit_code is not None:
                continue
            if now - handle.last_seen > self._timeout:
                self._log.error(
                    "worker {slot} (pid {pid}) silent for {t:.0f}s (blocked reactor?); killing it",
                    slot=handle.slot,
                    pid=handle.pid,
                    t=now - handle.last_seen,
                )
                handle.last_seen = now  # one kill per timeout
                handle.signal(signal.SIGKILL)

    def healthy(self) -> bool:
        """Every running worker of the serving generation has a fresh heartbeat."""
        now = self._clock.seconds()
        return all(now - h.last_seen <= self._timeout for h in self._pool.current if h.exit_code is None)
