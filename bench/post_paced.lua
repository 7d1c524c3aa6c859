-- post.lua, paced: each connection waits WRK_PACE_MS after every response
-- before sending its next request (Debian's wrk has no -R), so 50
-- connections offer about 50 * 1000 / (WRK_PACE_MS + latency) req/s.
-- Used for tail latency at a fixed fraction of the peak, not for throughput.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "post.lua")

local pace = tonumber(os.getenv("WRK_PACE_MS") or "10")
function delay()
  return pace
end
