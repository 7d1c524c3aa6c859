"""The Lua scripts of the counters, and a runner that caches them by SHA.

Every script touches keys of one slot only (see keys.py) and validates all
its arguments before its first write: Redis does not roll a script back,
so an error half-way would leave half a batch applied.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks

from relayd.redis.client import ResponseError

#: TAKE: move up to ARGV[1] items from the list's tail (oldest) into the
#: empty processing list and return the processing list.  A non-empty
#: processing list is an unfinished batch (a crash, a lost reply): it is
#: returned as it is and nothing new is taken, so a batch never changes once
#: it may have been applied.  ARGV[1] = 0 only returns it (recovery).
#:
#: The reply is ONE bulk string, ``len:item`` for each item (the digest's
#: input, `aggregate.split_packed` reads it): txredisapi parses a multi-bulk
#: reply of 10k items in quadratic time (~150 us an item), one bulk string
#: in linear time.  The batch id (SHA-1 of that string) is stored next to
#: the processing list (KEYS[3]) in the same step, so COMPLETE can fence
#: on it without reading the batch again.
TAKE = r"""
local function pack(items)
  -- two parts per item: no new 150-byte string per item, one copy in concat
  local parts = {}
  for i = 1, #items do
    parts[2 * i - 1] = #items[i] .. ':'
    parts[2 * i] = items[i]
  end
  return table.concat(parts)
end
local existing = redis.call('LRANGE', KEYS[2], 0, -1)
if #existing > 0 then
  local packed = pack(existing)
  if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('SET', KEYS[3], redis.sha1hex(packed)) end
  return packed
end
local n = tonumber(ARGV[1])
if n <= 0 then return '' end
local items = redis.call('LRANGE', KEYS[1], -n, -1)
if #items == 0 then return '' end
if redis.call('LLEN', KEYS[1]) == #items then
  redis.call('RENAME', KEYS[1], KEYS[2])  -- all of it: O(1), same slot
else
  redis.call('LTRIM', KEYS[1], 0, -#items - 1)
  for i = 1, #items, 1000 do
    redis.call('RPUSH', KEYS[2], unpack(items, i, math.min(i + 999, #items)))
  end
end
local packed = pack(items)
redis.call('SET', KEYS[3], redis.sha1hex(packed))
return packed
"""

#: DIGEST (Lua helper, inlined): the batch id of a list's items, the same
#: as aggregate.batch_digest.
_DIGEST = r"""
local function digest(items)
  local parts = {}
  for i = 1, #items do
    parts[2 * i - 1] = #items[i] .. ':'
    parts[2 * i] = items[i]
  end
  return redis.sha1hex(table.concat(parts))
end
"""

#: COMPLETE: the batch leaves the processing list (KEYS[1]) only if it is
#: still the batch with id ARGV[1] (KEYS[3], written by TAKE); with
#: ARGV[2] ~= '' its summary is pushed to the PostgreSQL pending list
#: (KEYS[2]) in the same step.  Returns 1 done, 0 already done (empty: a
#: resend), -1 fenced (another batch is there now: this one was completed
#: by someone else).  Idempotent.
COMPLETE = r"""
if redis.call('LLEN', KEYS[1]) == 0 then return 0 end
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
if ARGV[2] ~= '' then redis.call('LPUSH', KEYS[2], ARGV[2]) end
redis.call('DEL', KEYS[1], KEYS[3])
return 1
"""

#: APPLY, in the hash's slot.  KEYS: hash, marker, seen sets (one per ts
#: bucket).  ARGV: marker_ttl, n, n x (field, sum), then per seen set:
#: expire_at, count, count x (id, field index, value).
#:
#: 1. marker present: the batch was applied (a resend, or a recovery after
#:    a crash after this script): return {0, <the duplicates it found>}.
#: 2. read-only pass: parse and check every argument, find ids already seen
#:    (SMISMEMBER) and subtract their values, and find the fields whose
#:    stored value HINCRBY could fail on (not an integer, or 19 digits: the
#:    total could leave int64); those are *excluded* (not written).
#: 3. writes, marker first (Redis 7 refuses a write script under OOM before
#:    it starts; the marker is also the first write for older servers' OOM
#:    checks): SET marker, SADD ids + EXPIREAT, HINCRBY per non-zero sum.
#: Returns {1, marker}.  The marker is ``<dup ids,>\n<excluded indexes,>``,
#: so a recovery learns exactly what the first run did.  Sums are exact:
#: |value| and |sum| < 2^53.
APPLY = r"""
local LIMIT = 9007199254740992
local function int(s)
  local v = tonumber(s)
  if v == nil or v ~= math.floor(v) or v >= LIMIT or v <= -LIMIT then
    return nil
  end
  return v
end
local marker = redis.call('GET', KEYS[2])
if marker then return {0, marker} end
local ttl = int(ARGV[1])
local n = int(ARGV[2])
if ttl == nil or n == nil or n < 0 then return redis.error_reply('RELAYD bad header') end
local fields, sums = {}, {}
local p = 3
for i = 1, n do
  fields[i] = ARGV[p]
  sums[i] = int(ARGV[p + 1])
  if fields[i] == nil or sums[i] == nil then return redis.error_reply('RELAYD bad sum ' .. i) end
  p = p + 2
end
local groups = {}
local dups = {}
for k = 3, #KEYS do
  local expire_at, count = int(ARGV[p]), int(ARGV[p + 1])
  if expire_at == nil or count == nil or count < 0 then return redis.error_reply('RELAYD bad group') end
  p = p + 2
  local ids, idx, vals = {}, {}, {}
  for j = 1, count do
    ids[j] = ARGV[p]
    idx[j] = int(ARGV[p + 1])
    vals[j] = int(ARGV[p + 2])
    if ids[j] == nil or idx[j] == nil or vals[j] == nil or idx[j] < 1 or idx[j] > n then
      return redis.error_reply('RELAYD bad message ' .. j)
    end
    p = p + 3
  end
  if count > 0 then
    local known = {}
    for i = 1, count, 1000 do
      local part = redis.call('SMISMEMBER', KEYS[k], unpack(ids, i, math.min(i + 999, count)))
      for q = 1, #part do known[i + q - 1] = part[q] end
    end
    for j = 1, count do
      if known[j] == 1 then
        sums[idx[j]] = sums[idx[j]] - vals[j]
        dups[#dups + 1] = ids[j]
      end
    end
  end
  groups[#groups + 1] = {KEYS[k], expire_at, ids}
end
local excluded, skip = {}, {}
for i = 1, n do
  if sums[i] ~= 0 then
    local cur = redis.call('HGET', KEYS[1], fields[i])
    if cur and (not cur:match('^%-?%d+$') or #(cur:gsub('^%-', '')) > 18) then
      excluded[#excluded + 1] = i
      skip[i] = true
    end
  end
end
local dupstr = table.concat(dups, ',') .. '\n' .. table.concat(excluded, ',')
redis.call('SET', KEYS[2], dupstr, 'EX', ttl)
for g = 1, #groups do
  local key, expire_at, ids = groups[g][1], groups[g][2], groups[g][3]
  if #ids > 0 then
    for i = 1, #ids, 1000 do
      redis.call('SADD', key, unpack(ids, i, math.min(i + 999, #ids)))
    end
    redis.call('EXPIREAT', key, expire_at)
  end
end
for i = 1, n do
  if sums[i] ~= 0 and not skip[i] then
    redis.call('HINCRBY', KEYS[1], fields[i], string.format('%.0f', sums[i]))
  end
end
return {1, dupstr}
"""

#: MOVE_ALL: append every entry of list KEYS[1] to list KEYS[2] (oldest
#: first) and delete KEYS[1]; both in the list's slot (adoption of a dead
#: process's PostgreSQL pending list).  Returns the count moved.
MOVE_ALL = r"""
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #items, 1, -1 do redis.call('RPUSH', KEYS[2], items[i]) end
redis.call('DEL', KEYS[1])
return #items
"""

#: TRIM_TAIL: remove the ARGV[1] oldest entries of KEYS[1] if they are
#: still the ones with digest ARGV[2] (the PostgreSQL flusher's "done";
#: fenced like COMPLETE).  Returns 1 done, 0 fenced or already done.
TRIM_TAIL = _DIGEST + r"""
local n = tonumber(ARGV[1])
local tail = redis.call('LRANGE', KEYS[1], -n, -1)
if #tail ~= n or digest(tail) ~= ARGV[2] then return 0 end
redis.call('LTRIM', KEYS[1], 0, -n - 1)
return 1
"""

#: CLAIM: take lease KEYS[1] for ARGV[1] for ARGV[2] ms if it is free or
#: already ARGV[1]'s (a restarted process takes its own lease back at once).
CLAIM = r"""
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class Script:
    """One Lua script run with EVALSHA, loaded again after NOSCRIPT.

    EVALSHA keeps a 1 MiB batch from also carrying the script text, and a
    Redis restart (empty script cache) costs one EVAL.
    """

    def __init__(self, source: str) -> None:
        self.source = source.encode("utf-8")
        self.sha = hashlib.sha1(self.source).hexdigest().encode("ascii")

    @inlineCallbacks
    def __call__(self, redis: Any, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        """Run the script on `redis` (anything with ``execute(*args)``)."""
        try:
            result = yield redis.execute(b"EVALSHA", self.sha, len(keys), *keys, *args)
        except ResponseError as e:
            if "NOSCRIPT" not in str(e):
                raise
            result = yield redis.execute(b"EVAL", self.source, len(keys), *keys, *args)
        return result


def run_script(script: Script, redis: Any, keys: Sequence[bytes], args: Sequence[Any]) -> Deferred:
    """`script(redis, keys, args)` as a Deferred (for typed callers)."""
    return script(redis, keys, args)  # type: ignore[no-any-return]
