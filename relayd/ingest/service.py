"""`IngestService`: the ingest listener's life cycle, above all its graceful stop.

Kept apart from `relayd.ingest.app` (the domain: routes, parsing, acks):
this is the order of a lossless stop, which touches the listener, the open
connections (`relayd.ingest.http_layer.IngestSite`) and the app's in-flight
count, and nothing of a request's content.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater

from relayd.ingest.app import IngestApp
from relayd.listener import ListenerService

DRAIN_GRACE = 0.25  # seconds idle keep-alives get to send one last request at stop


class IngestService(ListenerService):
    """Listens for ingest traffic; stops gracefully.

    Stop order: stop listening, refuse new requests on open connections,
    close idle keep-alives, wait for in-flight requests (stored acks need the
    forwarder, which is stopped after this), then close what remains.
    """

    def __init__(self, endpoint: Any, site: Any, app: IngestApp, timeout: float, clock: Any) -> None:
        super().__init__(endpoint, site, "ingest")
        self._site = site
        self.app = app
        self._timeout = timeout
        self._clock = clock

    def startService(self) -> None:
        """Bind (if not yet) and start the ack-timeout sweeper."""
        super().startService()
        self.app.start()

    async def _stop(self) -> None:
        await ListenerService.stopService(self)
        self.app.begin_stop()
        if any(channel.idle for channel in self._site.channels):
            # Closing an idle keep-alive races with a request the client is
            # sending right now (a broken pipe for it).  Busy clients send
            # their next request within this grace and get it answered with
            # Connection: close; only connections idle through it are closed.
            await deferLater(self._clock, DRAIN_GRACE, lambda: None)
        for channel in list(self._site.channels):
            if channel.idle:
                channel.loseConnection()
        drained = self.app.wait_idle()
        timeout = self._clock.callLater(self._timeout, drained.cancel)
        try:
            await drained
        except CancelledError:
            self._log.warn("shutdown: in-flight requests still open after {t}s", t=self._timeout)
        else:
            if timeout.active():
                timeout.cancel()
        for channel in list(self._site.channels):
            channel.loseConnection()
        self.app.stop()

    def stopService(self) -> Deferred[None]:
        """Stop listening and drain in-flight requests."""
        return Deferred.fromCoroutine(self._stop())
