"""The Lua scripts of the counters, and a runner that caches them by SHA.

Every script touches keys of one slot only (see keys.py) and validates all
its arguments before its first write: Redis does not roll a script back,
so an error half-way would leave half a batch applied.
"""

from __future__ import annotations

#: TAKE: move up to ARGV[1] items from the list's tail (oldest) into the
#: empty processing list and return the batch.  A non-empty processing list
#: is an unfinished batch (a crash, a lost reply): it is returned as it is
#: and nothing new is taken, so a batch never changes once it may have been
#: applied.  ARGV[1] = 0 only returns it (recovery).
#:
#: The reply is {id, lengths, items}: the batch id, the items' lengths
#: joined by commas, and the items concatenated (`aggregate.Framed`); three
#: bulk strings, not one per item (txredisapi parses a multi-bulk reply of
#: 10k items in quadratic time).  The batch id is SHA-1 of
#: ``<lengths>\n<SHA-1 hex of the items>`` (the lengths make it injective;
#: hashing the hash spares Redis a copy of the whole batch), stored next to
#: the processing list (KEYS[3]) in the same step and returned from there by
#: every later TAKE of the same batch, so the id a batch was applied under
#: never changes, even across an upgrade that changed its definition;
#: COMPLETE fences on it.  Cost: Redis spends ~1.5 us an item here, most of
#: it in Lua's table.concat of the items (measured; a ``len:item`` string per
#: item built in Lua cost as much again).
TAKE = r"""
local function frame(items)
  local lens = {}
  for i = 1, #items do lens[i] = #items[i] end
  local lengths, body = table.concat(lens, ','), table.concat(items)
  return lengths, body, redis.sha1hex(lengths .. '\n' .. redis.sha1hex(body))
end
local existing = redis.call('LRANGE', KEYS[2], 0, -1)
if #existing > 0 then
  local lengths, body, id = frame(existing)
  local stored = redis.call('GET', KEYS[3])
  if stored then
    id = stored
  else
    redis.call('SET', KEYS[3], id)
  end
  return {id, lengths, body}
end
local n = tonumber(ARGV[1])
if n <= 0 then return {} end
local items = redis.call('LRANGE', KEYS[1], -n, -1)
if #items == 0 then return {} end
if redis.call('LLEN', KEYS[1]) == #items then
  redis.call('RENAME', KEYS[1], KEYS[2])  -- all of it: O(1), same slot
else
  redis.call('LTRIM', KEYS[1], 0, -#items - 1)
  for i = 1, #items, 1000 do
    redis.call('RPUSH', KEYS[2], unpack(items, i, math.min(i + 999, #items)))
  end
end
local lengths, body, id = frame(items)
redis.call('SET', KEYS[3], id)
return {id, lengths, body}
"""

#: DIGEST (Lua helper, inlined): the fence digest of a list's entries, the
#: same as aggregate.batch_digest (SHA-1 of ``len:entry`` each).
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
#: expire_at, count, count x message id, then d, d x declared duplicate id.
#:
#: 1. marker present: the batch was applied (a resend, or a recovery after
#:    a crash after this script): return {0, <the marker>}, no writes.
#: 2. read-only pass: check the argument counts, look the ids up in the
#:    seen sets (SMISMEMBER, straight from ARGV).  If the ids found are not
#:    exactly the declared duplicates, return {2, <the ids found>} with no
#:    writes: the client takes those messages out of its sums and calls
#:    again declaring them (a duplicate is rare: the outbox pushed a
#:    message twice).  The sums never pass through Lua numbers.
#: 3. writes, marker first (Redis 7 refuses a write script under OOM before
#:    it starts; the marker is also the first write for older servers' OOM
#:    checks): SET marker, SADD ids + EXPIREAT, one HINCRBY per field run
#:    with pcall: HINCRBY checks its own field atomically (not an integer,
#:    or the total would leave int64: the field is left as it was) and such
#:    a field is *excluded*, not a half-applied batch; then the marker is
#:    rewritten with the outcome.
#: Returns {1, marker}.  The marker is ``<dup ids,>\n<excluded indexes,>``,
#: so a recovery learns exactly what the first run did.
APPLY = r"""
local marker = redis.call('GET', KEYS[2])
if marker then return {0, marker} end
local ttl = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
if ttl == nil or n == nil or n < 0 then return redis.error_reply('RELAYD bad header') end
local p = 3 + 2 * n
local groups = {}
local dups = {}
for k = 3, #KEYS do
  local expire_at, count = tonumber(ARGV[p]), tonumber(ARGV[p + 1])
  if expire_at == nil or count == nil or count < 0 or p + 1 + count > #ARGV then
    return redis.error_reply('RELAYD bad group')
  end
  local first = p + 2
  for i = first, first + count - 1, 1000 do
    local last = math.min(i + 999, first + count - 1)
    local part = redis.call('SMISMEMBER', KEYS[k], unpack(ARGV, i, last))
    for q = 1, #part do
      if part[q] == 1 then dups[#dups + 1] = ARGV[i + q - 1] end
    end
  end
  groups[#groups + 1] = {KEYS[k], ARGV[p], first, count}
  p = first + count
end
local declared = tonumber(ARGV[p])
if declared == nil or p + declared ~= #ARGV then return redis.error_reply('RELAYD bad declared duplicates') end
local same = declared == #dups
if same and declared > 0 then
  local expected = {}
  for i = p + 1, p + declared do expected[ARGV[i]] = true end
  for i = 1, #dups do
    if not expected[dups[i]] then same = false break end
  end
end
if not same then return {2, table.concat(dups, ',')} end
redis.call('SET', KEYS[2], '', 'EX', ttl)
for g = 1, #groups do
  local key, expire_at, first, count = groups[g][1], groups[g][2], groups[g][3], groups[g][4]
  if count > 0 then
    for i = first, first + count - 1, 1000 do
      redis.call('SADD', key, unpack(ARGV, i, math.min(i + 999, first + count - 1)))
    end
    redis.call('EXPIREAT', key, expire_at)
  end
end
local excluded = {}
for i = 1, n do
  local r = redis.pcall('HINCRBY', KEYS[1], ARGV[1 + 2 * i], ARGV[2 + 2 * i])
  if type(r) == 'table' and r.err then excluded[#excluded + 1] = i end
end
local outcome = table.concat(dups, ',') .. '\n' .. table.concat(excluded, ',')
redis.call('SET', KEYS[2], outcome, 'EX', ttl)
return {1, outcome}
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
