"""Lua scripts run by SHA1: EVALSHA, and EVAL once when Redis does not know them.

EVALSHA keeps a large batch from also carrying the script text; a Redis
restart (empty script cache) costs one EVAL.  Used by delivery, counters
and the outbox's dedup target (which builds its command as a tuple for the
one writer: `Script.command` + `Script.execute`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence, Tuple

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from relayd.redis.client import ResponseError


class Script:
    """One Lua script, run by its SHA1 (loaded on first use and after a Redis restart)."""

    def __init__(self, source: str) -> None:
        self.source = source.encode("utf-8")
        self.sha = hashlib.sha1(self.source).hexdigest().encode("ascii")

    def command(self, keys: Sequence[bytes], args: Sequence[Any] = ()) -> Tuple[Any, ...]:
        """The ``EVALSHA`` command as a tuple (numkeys as bytes: the encoder's one-join path), for callers
        that hand commands around (the outbox writer)."""
        return (b"EVALSHA", self.sha, b"%d" % len(keys), *keys, *args)

    def execute(self, redis: Any, command: Sequence[Any]) -> Deferred[Any]:
        """Run a `command` tuple on `redis`; an ``EVALSHA`` of this script is re-sent as ``EVAL`` after NOSCRIPT."""
        d: Deferred[Any] = redis.execute(*command)
        if command[0] != b"EVALSHA" or command[1] != self.sha:
            return d

        def noscript(failure: Failure) -> Any:
            failure.trap(ResponseError)
            if "NOSCRIPT" not in str(failure.value):
                return failure
            return redis.execute(b"EVAL", self.source, *command[2:])

        return d.addErrback(noscript)

    def run(self, redis: Any, keys: Sequence[bytes], args: Sequence[Any] = ()) -> Deferred[Any]:
        """EVALSHA on `redis` (anything with ``execute(*args)``), or EVAL after NOSCRIPT."""
        return self.execute(redis, self.command(keys, args))

    __call__ = run
