"""Claims: the per-process processing list, its lease, and the reaper.

A process claims a message by moving it (BLMOVE, atomically) from the list
into its own processing list; it leaves that list only after its 2xx, its
dead-lettering or its move to the retry set.  If the process dies (kill -9,
power loss), its processing list stays behind: every process refreshes a
lease key with a TTL (the ``visibility_timeout``) and registers itself in the
deliver's consumer set, and every process's reaper returns the items of a
registered process whose lease expired.

The visibility timeout is *not* a per-message deadline (svix-webhooks#2181
delivered twice at once when the HTTP timeout exceeded it): a live process
keeps its lease however slow its upstream is, so only a dead (or frozen for
longer than the timeout) process's messages are taken over.
"""

from __future__ import annotations

import os
import random
import socket
from typing import Any, Optional

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relayd.deliver.keys import DeliverKeys
from relayd.deliver.scripts import REGISTER, RETURN_CLAIMS


def new_process_id() -> str:
    """Unique per process and host: ``<host>-<pid>-<random>`` (no ``:``, which splits key names)."""
    host = socket.gethostname().replace(":", "_").replace("{", "_").replace("}", "_") or "host"
    return f"{host}-{os.getpid()}-{random.getrandbits(32):08x}"


class Claims:
    """Keeps this process's lease alive and reaps the claims of dead ones."""

    _log = Logger()

    def __init__(self, reactor: Any, redis: Any, keys: DeliverKeys, proc_id: str, visibility_timeout: float) -> None:
        self._reactor = reactor
        self._redis = redis
        self._keys = keys
        self._proc = proc_id.encode()
        self._ttl_ms = max(1, int(visibility_timeout * 1000))
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._interval = visibility_timeout / 3.0  # two refreshes may fail before the lease lapses
        self.registered = False  # True once the lease is in Redis (claims wait for it)
        self._tick_running: Optional[Deferred] = None

    def start(self) -> None:
        """Refresh the lease and reap every third of the visibility timeout."""
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        """Stop refreshing (the lease then expires unless `release` deletes it)."""
        if self._loop.running:
            self._loop.stop()

    def redis_reconnected(self) -> None:
        """A Redis that restarted may have lost the lease and registry: register before claiming."""
        self.registered = False
        if self._loop.running:
            self._loop.reset()
            self._tick()

    def _tick(self) -> Optional[Deferred]:
        if self._tick_running is not None:
            return None
        d = ensureDeferred(self._refresh_and_reap())
        self._tick_running = d

        def done(_: object) -> None:
            self._tick_running = None

        d.addBoth(done)
        return None  # never stop the loop on an error

    async def _refresh_and_reap(self) -> None:
        k = self._keys
        try:
            await REGISTER.run(self._redis, [k.lease, k.consumers], [self._proc, self._ttl_ms])
            self.registered = True
            members = await self._redis.execute(b"SMEMBERS", k.consumers)
            for proc in members or ():
                if proc == self._proc:
                    continue
                n = await RETURN_CLAIMS.run(
                    self._redis, [k.lease_of(proc), k.processing_of(proc), k.list, k.consumers], [proc, b"0"]
                )
                if n and int(n) > 0:
                    self._log.warn(
                        "deliver: returned {count} messages claimed by dead process {proc} to {list}",
                        count=int(n), proc=proc.decode("utf-8", "replace"), list=k.list.decode("utf-8", "replace"),
                    )
        except Exception as e:  # Redis down: the next tick tries again
            self._log.debug("deliver: lease refresh failed: {error}", error=e)

    def release(self) -> Deferred:
        """At a graceful stop: every claimed item back to the list, lease and registration gone."""
        k = self._keys
        return RETURN_CLAIMS.run(self._redis, [k.lease, k.processing, k.list, k.consumers], [self._proc, b"1"])
