"""Listening sockets that fail loudly and early.

twistd calls `privilegedStartService` before the reactor runs (and before
daemonizing), so binding there turns "address in use" or "permission
denied" into an immediate exit with one line on stderr, instead of a
daemon that runs without its port.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure


class ListenerService(Service):
    """Binds `endpoint` with `factory` at privileged start; stops listening on stop."""

    _log = Logger()

    def __init__(self, endpoint: Any, factory: Any, what: str) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._what = what
        self.port: Any = None
        self.listening: Deferred = Deferred()

    def privilegedStartService(self) -> None:
        """Bind now; exit with status 2 if that fails synchronously."""
        super().privilegedStartService()
        failure: Optional[Failure] = None

        def bound(port: Any) -> None:
            self.port = port
            self._log.info("{what} listening on {address}", what=self._what, address=port.getHost())
            self.listening.callback(port)

        def failed(f: Failure) -> None:
            nonlocal failure
            failure = f

        self._endpoint.listen(self._factory).addCallbacks(bound, failed)
        if failure is not None:
            sys.stderr.write(f"relayd: cannot listen for {self._what}: {failure.getErrorMessage()}\n")
            sys.stderr.flush()
            raise SystemExit(2)

    def startService(self) -> None:
        """Bind here too when nobody called `privilegedStartService` (tests)."""
        if self.port is None and not self.listening.called:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred:
        """Stop accepting connections."""
        super().stopService()
        if self.port is None:
            return succeed(None)
        return self.port.stopListening()
