-- wrk script of the Isthmus HTTP ingest benchmark (bench/run.py).
--
--   wrk -t1 -c64 -d10s --latency -s bench/wrk_post.lua http://127.0.0.1:PORT -- DEVICES [TOKEN_FMT] [BODY]
--
-- Every request is a POST of BODY (Content-Type: application/json) to /api/v1/<token>/telemetry,
-- where <token> = string.format(TOKEN_FMT, k) and k cycles 1, 2, …, DEVICES, 1, … on every
-- connection of a thread (threads start at different devices). Responses outside 2xx are
-- counted by status code; done() prints them on one line that bench/run.py parses:
--
--   ISTHMUS_NON2XX 401:12,503:3        (empty after the keyword when every response was 2xx)

local default_body = '{"temperature":21.5,"humidity":60,"battery":4.1,"rssi":-67,"fw":"1.4.2","seq":1234567}'

local all_threads = {}
local next_thread_id = 0

-- Per-thread state (each wrk thread has its own Lua interpreter).
local requests = {}
local count = 0
local position = 0
non2xx = {}

function setup(thread)
  thread:set("thread_id", next_thread_id)
  next_thread_id = next_thread_id + 1
  table.insert(all_threads, thread)
end

function init(args)
  local devices = tonumber(args[1]) or 1000
  local token_fmt = args[2] or "tok-%06d"
  local body = args[3] or default_body
  local headers = { ["Content-Type"] = "application/json" }
  for k = 1, devices do
    local path = "/api/v1/" .. string.format(token_fmt, k) .. "/telemetry"
    requests[k] = wrk.format("POST", path, headers, body)
  end
  count = devices
  -- Spread the threads over the devices (a prime stride keeps them apart for any count).
  position = ((tonumber(thread_id) or 0) * 7907) % count
end

function request()
  position = position % count + 1
  return requests[position]
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx[status] = (non2xx[status] or 0) + 1
  end
end

function done(summary, latency, reqs)
  local totals = {}
  for _, thread in ipairs(all_threads) do
    local counts = thread:get("non2xx") or {}
    for status, n in pairs(counts) do
      totals[status] = (totals[status] or 0) + n
    end
  end
  local codes = {}
  for status in pairs(totals) do
    table.insert(codes, status)
  end
  table.sort(codes)
  local parts = {}
  for _, status in ipairs(codes) do
    table.insert(parts, status .. ":" .. totals[status])
  end
  io.write("ISTHMUS_NON2XX " .. table.concat(parts, ",") .. "\n")
end
