"""All the delivers of one process, as one service that SIGHUP can reconfigure.

`DeliverManager.reconfigure` compares the new ``[[deliver]]`` sections with
the running ones by name: a removed or changed deliver stops gracefully (its
claims go back to the list), an added or changed one starts.  Unchanged ones
keep running untouched.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.logger import Logger

from relayd.config import DeliverConfig, RedisConfig
from relayd.deliver.claims import new_process_id
from relayd.deliver.service import DeliverService
from relayd.deliver.signing import load_secret
from relayd.ops.metrics import Metrics


class DeliverManager(Service):
    """Runs one `DeliverService` per ``[[deliver]]``; stops them all in parallel."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        delivers: Sequence[DeliverConfig],
        redis: Any,
        redis_config: RedisConfig,
        metrics: Metrics,
        shutdown_timeout: float,
        proc_id: Optional[str] = None,
        read_secret: Callable[[str], bytes] = load_secret,
    ) -> None:
        self._reactor = reactor
        self._redis = redis
        self._redis_config = redis_config
        self._metrics = metrics
        self._shutdown_timeout = shutdown_timeout
        self.proc_id = proc_id or new_process_id()
        self._read_secret = read_secret
        self.services: Dict[str, DeliverService] = {}
        for config in delivers:
            self.services[config.name] = self._build(config)
        self._pending: List[Deferred] = []
        self._known = set(self.services)

    def _build(self, config: DeliverConfig) -> DeliverService:
        key = self._read_secret(config.sign_secret_file) if config.sign_secret_file else None
        return DeliverService(
            self._reactor,
            config,
            self._redis,
            self._redis_config,
            self._metrics.deliver(config.name),
            self.proc_id,
            key,
            self._shutdown_timeout,
        )

    def startService(self) -> None:
        """Start every deliver."""
        super().startService()
        for service in self.services.values():
            service.startService()

    def stopService(self) -> Deferred:
        """Stop every deliver gracefully, in parallel; fires when all are done."""
        if not self.running:
            return succeed(None)
        super().stopService()
        stops = [service.stopService() for service in self.services.values()] + self._pending
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)

    def reconfigure(self, delivers: Sequence[DeliverConfig]) -> Deferred:
        """SIGHUP: stop removed/changed delivers, start added/changed ones."""
        return ensureDeferred(self._reconfigure(delivers))

    async def _reconfigure(self, delivers: Sequence[DeliverConfig]) -> None:
        wanted = {d.name: d for d in delivers}
        stopping = []
        for name, service in list(self.services.items()):
            if wanted.get(name) != service.config:
                del self.services[name]
                stopping.append(service.stopService())
        # A changed deliver's old claims are back in the list before the new one claims.
        if stopping:
            d = DeferredList(stopping, consumeErrors=True)
            self._pending.append(d)
            await d
            self._pending.remove(d)
        for name in self._known - set(wanted):
            self._metrics.forget_deliver(name)
        self._known = set(wanted)
        for name, config in wanted.items():
            if name not in self.services:
                service = self._build(config)
                self.services[name] = service
                if self.running:
                    service.startService()
        self._log.info("deliver: {count} delivers configured", count=len(self.services))
