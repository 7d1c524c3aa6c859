"""Group commit: what one sync makes durable, and doing it off the reactor thread.

One fsync answers many appends: under ``fsync="batch"`` the daemon appends
for a couple of milliseconds and then syncs once.  The fsync is the slow
part (0.2-0.5 ms on a shared virtio disk), so it runs in a thread while the
`Spool` keeps appending.  `Spool.begin_sync` hands out a `SyncPlan` that
*owns* its file descriptors (sealed segments' fds, a dup of the active one)
and a snapshot of the cursor document; `run_sync` touches nothing else, so
it is thread-safe by construction; `Spool.end_sync` records the outcome back
on the owning thread.

Order matters: segment data first, then the cursor (``meta.json``), then
the directory, so the durable cursor never covers data that is not durable.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import attrs

from relayd.spool import segments
from relayd.spool.meta import write_meta

__all__ = ["SyncPlan", "run_sync"]


@attrs.define
class SyncPlan:
    """What one group commit makes durable (see `Spool.begin_sync`)."""

    path: str
    fds: List[int]  # owned: closed by `run_sync`
    dir: bool
    meta: Optional[Dict[str, int]]


def run_sync(plan: SyncPlan) -> None:
    """Perform a plan: fdatasync the segments, then the directory and the cursor.

    Touches only the plan's own fds and files, so it may run in a thread
    while the owning `Spool` keeps appending.  Raises OSError.
    """
    try:
        for fd in plan.fds:
            segments.fdatasync(fd)
    finally:
        for fd in plan.fds:
            os.close(fd)
    if plan.meta is not None:
        write_meta(plan.path, plan.meta, durable=True)
    if plan.dir or plan.meta is not None:
        segments.fsync_dir(plan.path)
