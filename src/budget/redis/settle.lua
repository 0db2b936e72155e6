-- Settlement of one request: its reservations released, what it consumed added once.
--
-- KEYS[1]          this settlement's marker: a retry after a lost reply changes nothing
-- KEYS[2..2nh+1]   the (counter, leases) pairs its reservations were held in
-- KEYS[2nh+2..]    the counters charged (the windows current at settlement)
-- ARGV             1 nh, 2 actual nusd, 3 actual tokens, 4 marker lifetime (s), 5 nr,
--                  then nr reservation ids, then per charged counter the seconds it lives on
-- Returns          the spent nusd of each charged counter afterwards, or {-1} if already done
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[4]) then
  return {-1}
end
local nh, nr = tonumber(ARGV[1]), tonumber(ARGV[5])
for i = 1, nh do
  local h, z = KEYS[2 * i], KEYS[2 * i + 1]
  for j = 1, nr do
    local id = ARGV[5 + j]
    -- Gone already when its lease ran out: the purge gave its room back then.
    if redis.call('ZREM', z, id) == 1 then
      local an = redis.call('HGET', h, 'n:' .. id)
      local at = redis.call('HGET', h, 't:' .. id)
      if an and an ~= '0' then redis.call('HINCRBY', h, 'rn', '-' .. an) end
      if at and at ~= '0' then redis.call('HINCRBY', h, 'rt', '-' .. at) end
      redis.call('HDEL', h, 'n:' .. id, 't:' .. id)
    end
  end
end
local out = {}
for c = 1, #KEYS - 1 - 2 * nh do
  local h = KEYS[1 + 2 * nh + c]
  out[c] = redis.call('HINCRBY', h, 'sn', ARGV[2])
  redis.call('HINCRBY', h, 'st', ARGV[3])
  redis.call('EXPIRE', h, ARGV[5 + nr + c])
end
return out
