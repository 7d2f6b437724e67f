-- wrk script: sets the caller's headers and writes a JSON summary with p99.9 (which `--latency`
-- does not print) to the file named by WRK_OUT. Used by loadtest/harness.py.
local token = os.getenv("WG_TOKEN") or ""
local purpose = os.getenv("WG_PURPOSE") or ""
if token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
if purpose ~= "" then
  wrk.headers["X-Purpose"] = purpose
end

done = function(summary, latency, requests)
  local out = os.getenv("WRK_OUT")
  if out == nil or out == "" then
    return
  end
  local f = assert(io.open(out, "w"))
  local e = summary.errors
  f:write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"stdev":%.1f,"min":%.1f,"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f,"max":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
  f:close()
end
