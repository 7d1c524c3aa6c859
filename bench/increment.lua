-- One valid increment per request (UUID key, positive value): what the
-- increment schema route accepts. Path from the URL given to wrk.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

wrk.method = "POST"
wrk.body = '{"key":"6f1c3c56-2f0a-4c1f-9e4b-2a1c5b9d8e7f","value":42}'
wrk.headers["Content-Type"] = "application/json"
