"""The systemd notify protocol (sd_notify(3)) without libsystemd.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace) to a ``Type=notify`` service; the service sends datagrams of
``KEY=VALUE`` lines to it: ``READY=1`` once it serves, ``RELOADING=1`` /
``STOPPING=1`` around a reload or stop, ``STATUS=...`` for
``systemctl status``, and ``WATCHDOG=1`` at least every ``WATCHDOG_USEC``
microseconds when the unit sets ``WatchdogSec``.

`Notifier` is inert when ``NOTIFY_SOCKET`` is unset (a terminal, the
tests), so callers never need to ask whether systemd is there.  The
watchdog is pinged from a `LoopingCall` on the reactor, so the ping stops
exactly when the reactor is blocked: that is the point.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: Ping at half the watchdog period, as sd_watchdog_enabled(3) recommends.
WATCHDOG_FRACTION = 0.5

#: Environment variables a child process must not inherit (only the main
#: pid may notify; a worker that pinged for the supervisor would hide a
#: blocked supervisor reactor).
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def _address(value: str) -> str:
    if value.startswith("@"):
        return "\0" + value[1:]
    return value


class Notifier:
    """Send sd_notify datagrams to ``$NOTIFY_SOCKET`` (if set)."""

    _log = Logger()

    def __init__(self, environ: Optional[Mapping[str, str]] = None, pid: Optional[int] = None) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET") or None
        self._pid = os.getpid() if pid is None else pid
        usec = env.get("WATCHDOG_USEC", "")
        wd_pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: Optional[float] = None
        if usec.isdigit() and int(usec) > 0 and (not wd_pid or wd_pid == str(self._pid)):
            self.watchdog_interval = int(usec) / 1e6 * WATCHDOG_FRACTION
        self._sock: Optional[socket.socket] = None
        self._watchdog: Optional[LoopingCall] = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        """True when a notify socket was given."""
        return self._address is not None

    def notify(self, **fields: Any) -> bool:
        """Send ``KEY=VALUE`` lines (``notify(READY=1, STATUS="...")``); False if not sent."""
        if self._address is None:
            return False
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, _address(self._address))
        except OSError as e:
            if not self._failed:  # say it once, not at every watchdog ping
                self._failed = True
                self._log.warn("sd_notify to {address} failed: {error}", address=self._address, error=e)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """``READY=1`` (with a status line)."""
        return self.notify(READY=1, STATUS=status) if status else self.notify(READY=1)

    def reloading(self, monotonic_usec: int) -> bool:
        """``RELOADING=1`` (``MONOTONIC_USEC`` lets Type=notify-reload pair it)."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec)

    def stopping(self) -> bool:
        """``STOPPING=1``."""
        return self.notify(STOPPING=1)

    def start_watchdog(self, clock: IReactorTime, healthy: Callable[[], bool] = lambda: True) -> None:
        """Ping ``WATCHDOG=1`` every half period from `clock` while `healthy()`."""
        if self._address is None or self.watchdog_interval is None or self._watchdog is not None:
            return

        def ping() -> None:
            if healthy():
                self.notify(WATCHDOG=1)

        self._watchdog = LoopingCall(ping)
        self._watchdog.clock = clock
        self._watchdog.start(self.watchdog_interval, now=True)

    def stop_watchdog(self) -> None:
        """Stop pinging."""
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None

    def close(self) -> None:
        """Stop the watchdog and close the socket."""
        self.stop_watchdog()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def child_environment(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """A copy of the environment without the systemd notify/activation variables."""
    env = dict(os.environ if environ is None else environ)
    for key in NOTIFY_ENV:
        env.pop(key, None)
    return env


class NotifyService(Service):
    """``READY=1`` when `ready` fires, the watchdog while running, ``STOPPING=1`` on stop.

    Added last to a single-process relayd, so it is stopped first: systemd
    hears ``STOPPING=1`` as the drain begins.
    """

    def __init__(
        self, reactor: IReactorTime, ready: Deferred[Any], status: str, notifier: Optional[Notifier] = None
    ) -> None:
        self._reactor = reactor
        self._core = IReactorCore(reactor)
        self._ready = ready
        self._status = status
        self.notifier = notifier if notifier is not None else Notifier()

    def startService(self) -> None:
        """Announce readiness once `ready` fires, then ping the watchdog."""
        super().startService()

        def announce(result: Any) -> Any:
            # The port is bound before the reactor runs (privileged start);
            # it answers once the reactor runs: announce from there.
            self._core.callWhenRunning(self._announce)
            return result

        self._ready.addCallback(announce)

    def _announce(self) -> None:
        if self.running:
            self.notifier.ready(self._status)
            self.notifier.start_watchdog(self._reactor)

    def stopService(self) -> Deferred[None]:
        """``STOPPING=1``; stop pinging."""
        super().stopService()
        self.notifier.stopping()
        self.notifier.stop_watchdog()
        return succeed(None)


class SupervisorNotify:
    """The supervisor's sd_notify: ``READY=1`` once all workers are ready, then the watchdog.

    Only the supervisor (the unit's main pid) notifies; the watchdog is
    pinged from its reactor, and only while `healthy()` (every worker's
    heartbeat is fresh), so a blocked supervisor *or* a blocked worker
    stops the pings.
    """

    _log = Logger(namespace="relayd.process.supervisor")

    def __init__(self, reactor: IReactorTime, notifier: Notifier, healthy: Callable[[], bool]) -> None:
        self._reactor = reactor
        self._notifier = notifier
        self._healthy = healthy
        self._announced = False

    def workers_ready(self, pids: Sequence[Optional[int]]) -> None:
        """Every worker of the first generation is ready: announce it (once)."""
        if self._announced:
            return
        self._announced = True
        self._log.info(
            "relayd ready: {count} workers listening (pids {pids})",
            count=len(pids),
            pids=", ".join(str(p) for p in pids),
        )
        self._notifier.ready(f"{len(pids)} workers ready")
        self._notifier.start_watchdog(self._reactor, self._healthy)

    def reloading(self) -> None:
        """``RELOADING=1`` with the monotonic timestamp systemd pairs it by."""
        self._notifier.reloading(int(time.monotonic() * 1e6))

    def status(self, text: str) -> None:
        """``READY=1`` with a status line (after a reload, whichever way it went)."""
        self._notifier.ready(text)

    def stopping(self) -> None:
        """``STOPPING=1``; no more watchdog pings."""
        self._notifier.stopping()
        self._notifier.stop_watchdog()
