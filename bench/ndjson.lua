-- NDJSON batch: 1000 lines of ~200 bytes each per request (one pre-built body).
-- BATCH_LINES can be overridden through the environment.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

local n = tonumber(os.getenv("BATCH_LINES") or "1000")
local lines = {}
for i = 1, n do
  local head = string.format('{"message":"this is lead %06d in a batch ', i)
  local tail = '","shop":"a23m07b23"}'
  lines[i] = head .. string.rep("x", 200 - #head - #tail) .. tail
end

wrk.method = "POST"
wrk.body = table.concat(lines, "\n") .. "\n"
wrk.headers["Content-Type"] = "application/x-ndjson"
