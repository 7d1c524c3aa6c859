-- Shared wrk hooks: print one machine-readable line at the end so run.py does
-- not have to scrape wrk's human output (which is kept under bench/results/).
-- No response() hook on purpose: defining it makes wrk parse every response
-- into Lua and would turn the single wrk thread into the bottleneck against
-- nginx. wrk counts non-2xx/3xx responses in summary.errors.status itself.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d,"lat_mean_us":%.1f}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
