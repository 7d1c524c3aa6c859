"""``GET /deliver`` and ``POST /deliver/<name>/replay``, answered from Redis.

The numbers are Redis's (every process and host sees the same): queued =
``LLEN <list>``; in flight = the items in every registered process's
processing list; waiting for retry = ``ZCARD`` of the retry set; dead =
``LLEN`` of the dead-letter list.  ``state`` is this process's circuit
breaker (``closed``, ``open``, ``half_open``); a multi-worker supervisor
asks every worker and reports the most open one.

Replay moves dead letters back one at a time, oldest first, in a safe order:
push the original message to the list (LPUSH, like a new message), then
remove that dead letter (LREM).  A crash in between leaves a duplicate,
never a loss; the dead list may be in another Cluster slot than the list.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from relayd.deliver import message as msg
from relayd.deliver.manager import DeliverManager

#: Replay stops after this many items per request (a huge dead list is
#: replayed by repeated calls; each answers its count).
MAX_REPLAY = 100_000


class DeliverAdmin:
    """The admin view of one process's delivers."""

    def __init__(self, manager: DeliverManager, redis: Any) -> None:
        self._manager = manager
        self._redis = redis

    async def status(self) -> Dict[str, Dict[str, Any]]:
        """Per deliver: queued, in_flight, waiting_for_retry, dead, state (+ paused_for seconds)."""
        out: Dict[str, Dict[str, Any]] = {}
        for name, service in sorted(self._manager.services.items()):
            k = service.keys
            queued = await self._redis.execute(b"LLEN", k.list)
            procs = await self._redis.execute(b"SMEMBERS", k.consumers)
            in_flight = 0
            for proc in procs or ():
                in_flight += int(await self._redis.execute(b"LLEN", k.processing_of(proc)))
            retry = await self._redis.execute(b"ZCARD", k.retry)
            dead = await self._redis.execute(b"LLEN", k.dead)
            out[name] = {
                "list": service.config.list,
                "queued": int(queued),
                "in_flight": in_flight,
                "waiting_for_retry": int(retry),
                "dead": int(dead),
                "state": service.breaker.state,
                "paused_for": round(service.gate.paused_for, 3),
            }
        return out

    def names(self) -> list:
        """The configured deliver names."""
        return sorted(self._manager.services)

    async def replay(self, name: str) -> Optional[int]:
        """Move every dead letter of `name` back to its list; None for an unknown name."""
        service = self._manager.services.get(name)
        if service is None:
            return None
        k = service.keys
        total = int(await self._redis.execute(b"LLEN", k.dead))
        moved = 0
        while moved < min(total, MAX_REPLAY):
            dead = await self._redis.execute(b"LINDEX", k.dead, -1)
            if dead is None:
                break
            await self._redis.execute(b"LPUSH", k.list, msg.replayed_item(dead))
            await self._redis.execute(b"LREM", k.dead, -1, dead)
            moved += 1
        return moved
