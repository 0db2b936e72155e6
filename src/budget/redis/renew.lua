-- Leases of requests still running on a live replica, pushed out again.
--
-- KEYS    leases (sorted sets), one per reservation id (repeats allowed)
-- ARGV    1 lease (ms), then the reservation id for each key
-- Returns how many were still there (a settled or expired one is not brought back)
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local expiry = now + tonumber(ARGV[1])
local n = 0
for i, z in ipairs(KEYS) do
  if redis.call('ZSCORE', z, ARGV[i + 1]) then
    redis.call('ZADD', z, 'XX', expiry, ARGV[i + 1])
    n = n + 1
  end
end
return n
