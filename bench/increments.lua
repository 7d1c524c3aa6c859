-- NDJSON increments for the counters benchmark: KEYS distinct UUID-like keys
-- (default 100000), BATCH_LINES lines per request (default 1000), each
-- {"key": "<uuid>", "value": 1}; requests cycle through the keys in order.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

local keys = tonumber(os.getenv("KEYS") or "100000")
local n = tonumber(os.getenv("BATCH_LINES") or "1000")
local bodies = {}
local k = 0
for b = 1, math.max(1, math.floor(keys / n)) do
  local lines = {}
  for i = 1, n do
    lines[i] = string.format('{"key":"00000000-0000-4000-8000-%012d","value":1}', k % keys)
    k = k + 1
  end
  bodies[b] = table.concat(lines, "\n") .. "\n"
end
local requests = {}
for b = 1, #bodies do
  requests[b] = wrk.format("POST", "/increments", {["Content-Type"] = "application/x-ndjson"}, bodies[b])
end
local next_body = 0
function request()
  next_body = next_body % #requests + 1
  return requests[next_body]
end
