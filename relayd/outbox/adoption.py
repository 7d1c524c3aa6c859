"""Per-worker spool directories: claiming one, and adopting orphans.

Layout below ``[spool] dir``::

    .claim.lock     flock-ed while a process picks, opens or removes a worker dir
    worker-0/       one `Spool` per directory, flock-ed by its owner (spool.py)
    worker-1/
    ...

A worker process at start takes the first ``worker-*`` directory that no
live process holds (so a restarted worker recovers its predecessor's records
through the normal spool recovery) or creates the next one (`claim`).

A directory nobody holds but which still has records is an *orphan*: its
worker crashed and was not restarted into it, or the daemon now runs fewer
workers.  Every worker runs an `OrphanAdopter`: every `SCAN_INTERVAL` it
looks for unlocked ``worker-*`` directories, opens each one (which locks
it), replays its records to Redis oldest first with the one replay loop
(`relayd.outbox.replay.Replayer`, through the one writer), one orphan at a
time, and when it is empty closes and removes it.  An empty orphan is
removed at once.

The claim lock makes "open or remove" atomic with respect to "pick": a
starting worker never picks a directory an adopter is about to delete.

Ordering: an adopted backlog is pushed alongside the adopter's own traffic,
so FIFO per list holds per worker process only (as the contract states),
not across a crash.  Delivery stays at-least-once: the read cursor is
durable only after Redis replied.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relayd.ops.metrics import Metrics
from relayd.outbox.replay import Replayer
from relayd.outbox.writer import RedisWriter
from relayd.spool.errors import SpoolError, SpoolLockedError
from relayd.spool.spool import Spool

CLAIM_LOCK = ".claim.lock"
WORKER_DIR_RE = re.compile(r"^worker-(\d+)$")
SCAN_INTERVAL = 2.0  # seconds: an orphan waits at most this long (plus a worker restart) to be picked up


def worker_dirs(base: str) -> List[Tuple[int, str]]:
    """``[(n, path)]`` of the ``worker-N`` directories below `base`, by n."""
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = WORKER_DIR_RE.match(name)
        path = os.path.join(base, name)
        if m and os.path.isdir(path):
            out.append((int(m.group(1)), path))
    return sorted(out)


@contextlib.contextmanager
def claim_lock(base: str, blocking: bool = True) -> Iterator[bool]:
    """Hold ``base/.claim.lock``; yields False (not held) if busy and not `blocking`."""
    os.makedirs(base, exist_ok=True)
    fd = os.open(os.path.join(base, CLAIM_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the flock


def claim(base: str, open_dir: Callable[[str], Any]) -> Tuple[str, Any]:
    """Open the first unlocked ``worker-*`` dir (or a new one) with `open_dir(path)`.

    `open_dir` must lock the directory (``Spool.open`` does) and raise
    `SpoolLockedError` when it is held.  Runs under the claim lock.
    """
    with claim_lock(base):
        dirs = worker_dirs(base)
        for _, path in dirs:
            try:
                return path, open_dir(path)
            except SpoolLockedError:
                continue
        n = dirs[-1][0] + 1 if dirs else 0
        path = os.path.join(base, f"worker-{n}")
        return path, open_dir(path)


def remove_spool_dir(path: str) -> bool:
    """Remove a closed, empty spool directory (keeps it if anything unknown, e.g. quarantine, is left)."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if name == "lock" or name.startswith("meta.json") or name.endswith(".seg"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


class OrphanAdopter(Service):
    """Finds spool directories without a live worker and drains them to Redis."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        base: str,
        own_path: Callable[[], Optional[str]],
        redis: Any,
        writer: RedisWriter,
        metrics: Metrics,
        max_bytes: int,
        fsync: str,
        interval: float = SCAN_INTERVAL,
    ) -> None:
        """`redis` is the client (readiness notices); `writer` writes through it."""
        self._reactor = reactor
        self._base = base
        self._own_path = own_path
        self._redis = redis
        self._writer = writer
        self._metrics = metrics
        self._max_bytes = max_bytes
        self._fsync = fsync
        self._interval = interval
        self._adopted: Dict[str, Spool] = {}
        self._current: Optional[Tuple[str, Spool, Replayer]] = None  # the orphan being replayed
        self._scan = LoopingCall(self.scan)
        self._scan.clock = reactor
        self.adopted_total = 0

    @property
    def pending_records(self) -> int:
        """Records waiting in adopted spools."""
        return sum(s.pending_records for s in self._adopted.values() if not s.closed)

    def startService(self) -> None:
        """Scan now and every `interval` seconds."""
        super().startService()
        self._scan.start(self._interval, now=True)
        self._redis.on_ready(self._kick)

    def stopService(self) -> Deferred:
        """Wait for batches on the wire, then close adopted spools (their records stay for the next adopter)."""
        super().stopService()
        if self._scan.running:
            self._scan.stop()
        d = self._current[2].stop() if self._current is not None else succeed(None)
        self._current = None

        def close(_: object) -> None:
            for spool in self._adopted.values():
                if not spool.closed:
                    spool.sync()
                    spool.close()
            self._adopted.clear()

        return d.addBoth(close)

    def scan(self) -> None:
        """Adopt every unlocked ``worker-*`` directory; remove the empty ones."""
        own = self._own_path()
        own = os.path.abspath(own) if own else None
        try:
            with claim_lock(self._base, blocking=False) as held:
                if not held:
                    return  # someone is claiming; next scan
                for _, path in worker_dirs(self._base):
                    if os.path.abspath(path) == own or path in self._adopted:
                        continue
                    try:
                        spool = Spool.open(path, self._max_bytes, fsync=self._fsync, clock=self._reactor.seconds)
                    except SpoolLockedError:
                        continue  # a live worker (or another adopter) holds it
                    except SpoolError as e:
                        self._log.warn("cannot adopt spool {path}: {error}", path=path, error=e)
                        continue
                    if spool.pending_records == 0:
                        spool.close()
                        remove_spool_dir(path)
                        continue
                    self._log.info(
                        "adopted orphan spool {path} with {count} records; replaying",
                        path=path,
                        count=spool.pending_records,
                    )
                    self.adopted_total += 1
                    self._adopted[path] = spool
        except OSError as e:
            self._log.warn("spool adoption scan failed: {error}", error=e)
        self._kick()

    def _kick(self) -> None:
        """Replay the current orphan, or start on the next one."""
        if not self.running:
            return
        if self._current is not None:
            self._current[2].kick()
            return
        for path, spool in self._adopted.items():
            replayer = Replayer(
                self._reactor,
                spool,
                self._writer,
                self._metrics,
                on_acked=spool.sync,  # an orphan has no group commit: sync each ack
                on_idle=functools.partial(self._drained, path, spool),
                pipeline=1,
            )
            self._current = (path, spool, replayer)
            replayer.start()
            return

    def _drained(self, path: str, spool: Spool) -> None:
        if self._current is None or self._current[1] is not spool:
            return
        replayer = self._current[2]
        self._current = None
        replayer.stop()
        self._release(path, spool)
        self._reactor.callLater(0, self._kick)

    def _release(self, path: str, spool: Spool) -> None:
        del self._adopted[path]
        with claim_lock(self._base):
            spool.close()
            removed = remove_spool_dir(path)
        self._log.info(
            "orphan spool {path} drained{removed}",
            path=path,
            removed=" and removed" if removed else " (kept: not empty)",
        )
