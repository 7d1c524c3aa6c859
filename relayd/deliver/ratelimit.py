"""The global rate: every relayd process and host on one Redis shares one schedule.

A per-process share of ``rate`` is wrong as soon as processes or hosts come
and go, so the schedule lives in Redis: one GCRA state per deliver
(``{list}:rate:<name>``), advanced by an atomic script (`scripts.GCRA`) that
grants a small batch of permits per round trip.  The tolerance -- how far
grants may run ahead of the schedule -- is `TOLERANCE` seconds (at least one
interval): it bounds the burst any window can see to ``rate * TOLERANCE``
extra requests, and lets one round trip grant several permits at high rates.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from twisted.internet.defer import Deferred

from relayd.deliver.scripts import GCRA

#: Seconds the granted schedule may run ahead: 50 ms of rate per burst, at
#: most; 0.5 % of a 10 s window.
TOLERANCE = 0.05
#: Most permits one round trip asks for (a process never needs more than its free slots).
MAX_BATCH = 64


class GlobalRateLimiter:
    """Permits from the shared GCRA schedule of one deliver."""

    def __init__(self, redis: Any, key: bytes, rate: Optional[Tuple[float, float]]) -> None:
        self._redis = redis
        self._key = key
        if rate is None:
            self.interval_us = 0
        else:
            tokens, per = rate
            self.interval_us = max(1, int(round(per / tokens * 1_000_000)))
        self.tolerance_us = max(self.interval_us, int(TOLERANCE * 1_000_000))

    @property
    def unlimited(self) -> bool:
        """No ``rate`` configured: every request may start at once."""
        return self.interval_us == 0

    def take(self, want: int) -> Deferred:
        """Ask for up to `want` permits: fires ``(granted, seconds until the next one)``."""
        want = max(1, min(want, MAX_BATCH))
        d = GCRA.run(self._redis, [self._key], [self.interval_us, self.tolerance_us, want])
        return d.addCallback(lambda r: (int(r[0]), int(r[1]) / 1_000_000))
