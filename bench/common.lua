-- Shared wrk hooks: print one machine-readable line at the end so run.py does
-- not have to scrape wrk's human output (which is kept under bench/results/).
--
-- wrk itself counts non-2xx/3xx responses (summary.errors.status). Counting
-- per status code needs a response() hook, which makes wrk hand every
-- response to Lua; that is cheap at Python-server rates but would make the
-- single wrk thread the bottleneck against nginx, so it is only defined when
-- WRK_STATUS_HOOK=1 (run.py sets it for every target except nginx).
local threads = {}
function setup(thread) table.insert(threads, thread) end

if os.getenv("WRK_STATUS_HOOK") == "1" then
  statuses = {}
  function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local parts = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    if s then
      for code, n in pairs(s) do table.insert(parts, string.format('"%d":%d', code, n)) end
    end
  end
  io.write(string.format(
    'BENCHJSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_p999_us":%d,"lat_max_us":%d,"lat_mean_us":%.1f,' ..
    '"statuses":{%s}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean, table.concat(parts, ",")))
end
