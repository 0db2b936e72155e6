-- Admission of one request against every budget window it falls under, all or nothing.
--
-- KEYS[1]     the team's marker, set by seed.lua once its counters hold the ledger's spend
-- KEYS[2i]    window i's counter, a hash: sn, st spent (nano-dollars, tokens); rn, rt
--             reserved; n:<id>, t:<id> what reservation <id> holds
-- KEYS[2i+1]  window i's leases: reservation ids scored by the time (ms) they expire
-- ARGV        1 reservation id ('' = only look), 2 lease (ms), 3 demand nusd, 4 demand tokens,
--             5 '1' to reserve even past the limits (spend already made while Redis was down),
--             then per window: limit nusd, limit tokens (-1 = none), seconds its keys live on
-- Returns     {1 if it fits, first window that does not (0 if all do),
--              then per window: spent nusd, spent tokens, reserved nusd, reserved tokens},
--             or {2, 0} when the marker is missing: Redis was flushed, evicted the team's keys
--             or is new, and its counters would start from zero; nothing is reserved then.
--
-- The clock is Redis's, so replicas whose clocks disagree still agree on when a lease ends.
-- Amounts are written from the argument strings, never from Lua numbers: Lua prints large
-- numbers with an exponent, which HINCRBY refuses. Comparisons use Lua numbers, exact below
-- 2^53 (9 million dollars in one window).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {2, 0}
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local rid, lease = ARGV[1], tonumber(ARGV[2])
local dn, dt = tonumber(ARGV[3]), tonumber(ARGV[4])
local force = ARGV[5] == '1'
local n = (#KEYS - 1) / 2
local out = {1, 0}
for i = 1, n do
  local h, z = KEYS[2 * i], KEYS[2 * i + 1]
  -- Leases of replicas that died (or requests that outlived them) give their room back.
  local dead = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, id in ipairs(dead) do
    local an = redis.call('HGET', h, 'n:' .. id)
    local at = redis.call('HGET', h, 't:' .. id)
    if an and an ~= '0' then redis.call('HINCRBY', h, 'rn', '-' .. an) end
    if at and at ~= '0' then redis.call('HINCRBY', h, 'rt', '-' .. at) end
    redis.call('HDEL', h, 'n:' .. id, 't:' .. id)
  end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now) end
  local v = redis.call('HMGET', h, 'sn', 'st', 'rn', 'rt')
  local sn, st = tonumber(v[1]) or 0, tonumber(v[2]) or 0
  local rn, rt = tonumber(v[3]) or 0, tonumber(v[4]) or 0
  local base = 5 + 3 * (i - 1)
  local ln, lt = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  if not force and out[1] == 1 and ((ln >= 0 and sn + rn + dn > ln) or (lt >= 0 and st + rt + dt > lt)) then
    out[1] = 0
    out[2] = i
  end
  out[#out + 1] = sn
  out[#out + 1] = st
  out[#out + 1] = rn
  out[#out + 1] = rt
end
if out[1] == 1 and rid ~= '' then
  for i = 1, n do
    local h, z = KEYS[2 * i], KEYS[2 * i + 1]
    local ttl = ARGV[5 + 3 * (i - 1) + 3]
    redis.call('HINCRBY', h, 'rn', ARGV[3])
    redis.call('HINCRBY', h, 'rt', ARGV[4])
    redis.call('HSET', h, 'n:' .. rid, ARGV[3], 't:' .. rid, ARGV[4])
    redis.call('ZADD', z, now + lease, rid)
    redis.call('EXPIRE', h, ttl)
    redis.call('EXPIRE', z, ttl)
  end
end
return out
