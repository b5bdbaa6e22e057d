-- POST one Messages request over and over (wrk's -s script), for the ccx-proxy bench.
-- BENCH_BODY_FILE: the JSON body; BENCH_HEADERS_FILE: "name: value" lines; BENCH_PATH.
local function slurp(name)
  local file = assert(io.open(os.getenv(name), "rb"))
  local text = file:read("*a")
  file:close()
  return text
end

wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/messages"
wrk.body = slurp("BENCH_BODY_FILE")
for line in slurp("BENCH_HEADERS_FILE"):gmatch("[^\r\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then wrk.headers[name] = value end
end
-- No request() function: wrk then formats the request once, after adding Host.

done = function(summary, latency, requests)
  -- one machine-readable line for the harness (wrk's own text report stays above it)
  io.write(string.format(
    "BENCH_JSON {\"requests\":%d,\"duration_us\":%d,\"errors_status\":%d,\"errors_connect\":%d," ..
    "\"errors_read\":%d,\"errors_write\":%d,\"errors_timeout\":%d," ..
    "\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"mean_us\":%.1f}\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
