"""The one writer: batches of ``(target, payloads)`` -> Redis commands.

Every path that stores messages in Redis goes through `RedisWriter`: the
forwarder's direct path, the replay of this process's spool, and the
adoption of orphaned spools.  So batching, metrics and (on a cluster) the
routing of each command to its node are decided in one place.

Each target's commands are issued at once and independently: one target's
failure (a node of a cluster that is down, a wrong-type key) does not fail
the others, and the caller learns the outcome per target.  Commands of one
target go out in order on one connection, so per-target order holds.

Readiness is asked per target too (`ready_for`): on a cluster, the primary
of one list can be down while the others take writes, and the forwarder
and the replay route around it instead of failing everything.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from relayd.ops.metrics import Metrics
from relayd.outbox.targets import Target
from relayd.redis.scripts import Script


class CommandRunner(Protocol):
    """The part of a Redis client the writer needs (`relayd.redis.client.RedisClient`)."""

    @property
    def ready(self) -> bool:
        """Can commands be issued now?"""

    def execute(self, *args: bytes) -> Deferred[Any]:
        """Run one command; its reply, or a failure."""


class RedisWriter:
    """Turns groups of payloads per target into Redis commands; one per process."""

    def __init__(self, clock: IReactorTime, redis: CommandRunner, metrics: Metrics) -> None:
        self._clock = clock
        self._redis = redis
        self._metrics = metrics
        # A cluster client answers per key (the slot's primary); one Redis is
        # all or nothing.
        self._ready_for_key: Optional[Callable[[bytes], bool]] = getattr(redis, "ready_for", None)
        self._any_ready: Optional[Callable[[], bool]] = getattr(redis, "any_ready", None)

    @property
    def ready(self) -> bool:
        """True while Redis takes commands (on a cluster: every slot does)."""
        return self._redis.ready

    @property
    def per_node(self) -> bool:
        """True when readiness differs per target (a cluster): one failure is not all of Redis."""
        return self._ready_for_key is not None

    @property
    def any_ready(self) -> bool:
        """True while some target can be written (one Redis: it is up; a cluster: some primary is)."""
        any_ready = self._any_ready
        return self._redis.ready if any_ready is None else any_ready()

    def ready_for(self, target: Target) -> bool:
        """True while the Redis node that stores `target` takes commands."""
        ready_for_key = self._ready_for_key
        return self._redis.ready if ready_for_key is None else ready_for_key(target.key)

    def write(self, target: Target, items: Sequence[bytes], source: str = "direct") -> Deferred[Optional[List[Optional[bytes]]]]:
        """Store `items` in `target`; fires once Redis replied to all of it.

        Fires with the target's per-item outcomes (`Target.outcomes`: None
        when every item is stored; for idempotent targets, the first copy's
        id for each duplicate).  A failure means some of the items may be
        stored (a timed-out command may still run): the caller retries or
        spills, and delivery is at-least-once.  `source` labels the
        duplicates metric (``direct``, ``replay``).
        """
        started = self._clock.seconds()
        commands = target.commands(items)
        script: Optional[Script] = getattr(target, "script", None)
        if len(commands) == 1:
            d = self._execute(commands[0], script)
            d.addCallback(_one)
        else:
            d = gatherResults([self._execute(c, script) for c in commands], consumeErrors=True)
            d.addErrback(_first_error)
        d.addCallback(self._written, target, items, started, source)
        return d

    def _execute(self, command: Tuple[bytes, ...], script: Optional[Script]) -> Deferred[Any]:
        """One command; through `script` (EVAL after NOSCRIPT) for a scripted target."""
        if script is None:
            return self._redis.execute(*command)
        return script.execute(self._redis, command)

    def _written(
        self, replies: List[object], target: Target, items: Sequence[bytes], started: float, source: str
    ) -> Optional[List[Optional[bytes]]]:
        metrics = self._metrics
        metrics.redis_latency.observe(self._clock.seconds() - started)
        metrics.batch_size.observe(len(items))
        outcomes = target.outcomes(replies)
        if outcomes is not None:
            dropped = sum(1 for o in outcomes if o is not None)
            if dropped:
                metrics.duplicates.labels(where=source).inc(dropped)
        # "forwarded" counts every message that reached Redis, by any path.
        # Stream targets filled from path templates label by their configured
        # name: one series per route, not per team.
        label = getattr(target, "metric_label", None) or target.key
        metrics.forwarded_to(label).inc(target.pushed(items, outcomes))
        return outcomes

    def write_groups(
        self, groups: Dict[Target, List[bytes]], source: str = "direct"
    ) -> Deferred[Dict[Target, Optional[Failure]]]:
        """Write every group concurrently; fires with ``{target: None or Failure}``."""
        targets = list(groups)

        def by_target(results: List[Tuple[bool, Any]]) -> Dict[Target, Optional[Failure]]:
            return {t: (None if ok else r) for t, (ok, r) in zip(targets, results)}

        d = DeferredList([self.write(t, groups[t], source) for t in targets], consumeErrors=True)
        return d.addCallback(by_target)


def _one(reply: object) -> List[object]:
    return [reply]


def _first_error(failure: Failure) -> Failure:
    """gatherResults wraps the first failure in a FirstError: unwrap it."""
    sub: Optional[Failure] = getattr(failure.value, "subFailure", None)
    return sub if sub is not None else failure
