"""``/deliver`` of a multi-worker daemon, answered by asking the live workers.

Queue numbers come from Redis and are the same in every worker; the circuit
breaker is per worker, so ``state`` is the most open one among them (and
``states`` lists each).  A replay runs in one worker.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from twisted.internet.defer import DeferredList

from relayd.process.aggregate import WorkerAdmin
from relayd.process.pool import WorkerHandle, WorkerPool

_ORDER = {"closed": 0, "half_open": 1, "open": 2}


class WorkersDeliverView:
    """The supervisor's `deliver=` view for `relayd.ops.admin.AdminApp`."""

    def __init__(self, admin: WorkerAdmin, pool: WorkerPool) -> None:
        self._admin = admin
        self._pool = pool

    def _live(self) -> List[WorkerHandle]:
        live = [h for h in self._pool.current if h.live]
        if not live:
            raise RuntimeError("no worker ready")
        return live

    async def status(self) -> Dict[str, Any]:
        """Every live worker's /deliver, merged."""
        results = await DeferredList([self._admin.get(h, "/deliver") for h in self._live()], consumeErrors=True)
        merged: Dict[str, Any] = {}
        for ok, result in results:
            if not ok or result[0] != 200:
                continue
            for name, entry in json.loads(result[1]).items():
                mine = merged.setdefault(name, dict(entry, states=[]))
                mine["states"].append(entry["state"])
                if _ORDER.get(entry["state"], 0) > _ORDER.get(mine["state"], 0):
                    mine["state"] = entry["state"]
                mine["paused_for"] = max(mine.get("paused_for", 0), entry.get("paused_for", 0))
        if not merged and not any(ok and result[0] == 200 for ok, result in results):
            raise RuntimeError("no worker answered /deliver")
        return merged

    async def replay(self, name: str) -> Optional[int]:
        """Replay in the first live worker; None when it knows no such deliver."""
        code, body = await self._admin.get(self._live()[0], f"/deliver/{name}/replay", b"POST")
        if code == 404:
            return None
        if code != 200:
            raise RuntimeError(f"worker answered {code}")
        return int(json.loads(body)["replayed"])
