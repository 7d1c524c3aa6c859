-- NDJSON batches (as ndjson.lua) sent round-robin to the paths in PATHS
-- ("/a,/b,/c"), so one wrk run feeds several routes (cluster_bench.py: one
-- list per Redis Cluster primary).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "ndjson.lua")

local paths = {}
for p in string.gmatch(os.getenv("PATHS") or "/leads", "[^,]+") do table.insert(paths, p) end
local requests = {}
local i = 0

function init(args)
  for k, p in ipairs(paths) do requests[k] = wrk.format("POST", p) end
end

function request()
  i = i % #requests + 1
  return requests[i]
end
