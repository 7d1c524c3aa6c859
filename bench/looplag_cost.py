"""Cost of the reactor loop-lag monitor (relayd/ops/looplag.py), against a bare LoopingCall.

Usage: ``python bench/looplag_cost.py [ticks]``

Drives both on a `task.Clock` (no sleeping: the figure is CPU per tick) and
reports microseconds per tick and the ratio to the reference measured in
the same run: a `LoopingCall` of a function that does nothing, i.e. the
floor of any periodic work on the reactor.  At one tick every 0.5 s the
monitor's CPU share is ``2 * us_per_tick / 1e6`` of one core.
"""

from __future__ import annotations

import sys
import time

from twisted.internet.task import Clock, LoopingCall

from relayd.ops.looplag import LAG_INTERVAL, LoopLagMonitor
from relayd.ops.metrics import Metrics


def _per_tick(advance: Clock, ticks: int) -> float:
    start = time.perf_counter()
    for _ in range(ticks):
        advance.advance(LAG_INTERVAL)
    return (time.perf_counter() - start) / ticks * 1e6


def reference(ticks: int) -> float:
    """Microseconds per tick of an empty LoopingCall."""
    clock = Clock()
    loop = LoopingCall(lambda: None)
    loop.clock = clock
    loop.start(LAG_INTERVAL, now=False)
    try:
        return _per_tick(clock, ticks)
    finally:
        loop.stop()


def monitor(ticks: int) -> float:
    """Microseconds per tick of the monitor feeding the real Prometheus histogram."""
    clock = Clock()
    service = LoopLagMonitor(clock, Metrics().reactor_lag)
    service.startService()
    try:
        return _per_tick(clock, ticks)
    finally:
        service.stopService()


def main() -> None:
    """Best of five runs each, interleaved (the machine may be noisy)."""
    ticks = int(sys.argv[1]) if len(sys.argv) > 1 else 50000
    ref = min(reference(ticks) for _ in range(5))
    mon = min(monitor(ticks) for _ in range(5))
    print(f"reference (empty LoopingCall): {ref:.2f} us/tick")
    print(f"loop-lag monitor:              {mon:.2f} us/tick  ({mon / ref:.2f}x reference)")
    print(f"CPU share at one tick per {LAG_INTERVAL} s: {mon / LAG_INTERVAL / 1e6:.2e} of one core")


if __name__ == "__main__":
    main()
