-- One ~200-byte JSON lead per request (keep-alive, POST).
-- Path comes from the URL given to wrk (e.g. http://127.0.0.1:PORT/leads).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

local head = '{"message":"this is a lead message '
local tail = '","shop":"a23m07b23"}'
local target = 200
local pad = string.rep("x", target - #head - #tail)

wrk.method = "POST"
wrk.body = head .. pad .. tail
wrk.headers["Content-Type"] = "application/json"
