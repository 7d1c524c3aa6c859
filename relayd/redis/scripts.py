"""Lua scripts run by SHA1: EVALSHA, and EVAL once when Redis does not know them.

EVALSHA keeps a large batch from also carrying the script text; a Redis
restart (empty script cache) costs one EVAL.  Used by delivery and counters.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from relayd.redis.client import ResponseError


class Script:
    """One Lua script, run by its SHA1 (loaded on first use and after a Redis restart)."""

    def __init__(self, source: str) -> None:
        self.source = source.encode("utf-8")
        self.sha = hashlib.sha1(self.source).hexdigest().encode("ascii")

    def run(self, redis: Any, keys: Sequence[bytes], args: Sequence[Any] = ()) -> Deferred[Any]:
        """EVALSHA on `redis` (anything with ``execute(*args)``), or EVAL after NOSCRIPT."""
        d: Deferred[Any] = redis.execute(b"EVALSHA", self.sha, b"%d" % len(keys), *keys, *args)

        def noscript(failure: Failure) -> Any:
            failure.trap(ResponseError)
            if "NOSCRIPT" not in str(failure.value):
                return failure
            return redis.execute(b"EVAL", self.source, b"%d" % len(keys), *keys, *args)

        return d.addErrback(noscript)

    __call__ = run
