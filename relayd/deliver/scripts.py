"""The Lua scripts of delivery: each moves items between keys of one slot atomically.

Every script's keys are companions of the deliver's list (relayd/deliver/keys.py),
so each runs on one Redis Cluster node.  `Script.run` uses EVALSHA and falls
back to EVAL on NOSCRIPT: a Redis that restarted (empty) has no script cache.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

from twisted.internet.defer import Deferred

from relayd.redis.client import ResponseError


class Script:
    """One Lua script, run by its SHA1 (loaded on first use and after a Redis restart)."""

    def __init__(self, source: str) -> None:
        self.source = source.encode("utf-8")
        self.sha = hashlib.sha1(self.source).hexdigest().encode("ascii")

    def run(self, redis: Any, keys: Sequence[bytes], args: Sequence[Any] = ()) -> Deferred:
        """EVALSHA, or EVAL when Redis does not know the script yet."""
        d: Deferred = redis.execute(b"EVALSHA", self.sha, len(keys), *keys, *args)

        def noscript(failure: Any) -> Any:
            failure.trap(ResponseError)
            if b"NOSCRIPT" not in str(failure.value).encode() and "NOSCRIPT" not in str(failure.value):
                return failure
            return redis.execute(b"EVAL", self.source, len(keys), *keys, *args)

        return d.addErrback(noscript)


#: A failed attempt: out of the processing list, into the retry set (due at ARGV[2]).
TO_RETRY = Script(
    """
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
)

#: Due retries back to the consuming end of the list (next to be claimed), oldest due first.
MOVE_DUE = Script(
    """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, item in ipairs(due) do
  redis.call('RPUSH', KEYS[2], item)
  redis.call('ZREM', KEYS[1], item)
end
return #due
"""
)

#: Return a process's claimed items to the list when its lease is gone (or when
#: it asks, at a graceful stop: ARGV[2] == '1').  Newest claim first to the
#: consuming end, so the oldest claim ends up next in line: order is kept.
RETURN_CLAIMS = Script(
    """
if ARGV[2] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  return -1
end
local n = 0
while redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT') do
  n = n + 1
end
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('DEL', KEYS[1])
return n
"""
)

#: GCRA: grant up to ARGV[3] permits at one per ARGV[1] microseconds, with a
#: tolerance of ARGV[2] microseconds (how far ahead of schedule grants may
#: run).  Time comes from Redis (TIME), so hosts with skewed clocks share one
#: schedule.  Returns {granted, microseconds until the next permit}.
GCRA = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local n = 0
if tat - now <= tolerance then
  n = math.floor((now + tolerance - tat) / interval) + 1
  if n > want then n = want end
  tat = tat + n * interval
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
return {n, math.ceil(wait)}
"""
)

#: Take (or refresh) this process's lease, then register it: in that order and
#: atomically, so a reaper never sees the registration without the lease.
REGISTER = Script(
    """
redis.call('SET', KEYS[1], '1', 'PX', tonumber(ARGV[2]))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
)

#: Claim up to ARGV[1] items at once, oldest first, without blocking (one
#: round trip for a batch; BLMOVE waits only when the list is empty).
CLAIM = Script(
    """
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local item = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not item then break end
  out[i] = item
end
return out
"""
)
