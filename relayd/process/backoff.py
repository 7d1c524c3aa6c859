# -*- test-case-name: tests.test_backoff -*-
"""When to restart a worker that died: jittered exponential backoff per slot.

A worker that crashes at start would otherwise be restarted in a tight
loop; one that ran a while and then died is restarted almost at once.
Pure bookkeeping (no timers): `relayd.process.pool` schedules the restart.
"""

from __future__ import annotations

import random
from typing import Dict, Optional

#: Backoff before restarting a dead worker: 0.1 s doubling to 10 s, jittered.
RESTART_BACKOFF_MIN = 0.1
RESTART_BACKOFF_MAX = 10.0
#: A worker that ran this long resets its slot's backoff.
RESTART_BACKOFF_RESET = 30.0


class RestartPolicy:
    """Consecutive quick deaths per slot -> the delay before the next start."""

    def __init__(self, rng: Optional[random.Random] = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._failures: Dict[int, int] = {}

    def delay(self, slot: int, ran_for: float) -> float:
        """Seconds to wait before restarting `slot`, whose worker ran `ran_for` seconds; counts the death."""
        if ran_for > RESTART_BACKOFF_RESET:
            self._failures[slot] = 0
        n = self._failures.get(slot, 0)
        self._failures[slot] = n + 1
        return float(min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN * 2**n) * self._rng.uniform(0.5, 1.0))

    def reset(self) -> None:
        """Forget every slot's deaths (a new generation starts fresh)."""
        self._failures.clear()
