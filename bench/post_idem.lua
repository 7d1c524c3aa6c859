-- post.lua with a unique Idempotency-Key on every request (the dedup cost benchmark).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "post.lua")

local n = 0
math.randomseed(os.time() + math.floor(os.clock() * 1e6))
local tid = tostring(os.time()) .. "-" .. tostring(math.random(1, 1e9))
function request()
  n = n + 1
  wrk.headers["Idempotency-Key"] = "k-" .. tid .. "-" .. n
  return wrk.format()
end
