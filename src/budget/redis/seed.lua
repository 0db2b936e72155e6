-- Spend the ledger holds for current windows, brought into counters that lack it.
--
-- KEYS      1 the team's marker, then counters (all of one team)
-- ARGV      1 seconds the marker lives on, then per counter: spent nusd, spent tokens (from
--           the ledger), seconds it lives on
--
-- A max, not a sum: replicas that seed at once, or a restart onto counters that are already
-- right, count nothing twice; a Redis that was flushed or is new gets the ledger's figures.
-- The marker tells admit.lua the team's counters are no longer missing their past.
for i = 2, #KEYS do
  local h = KEYS[i]
  local b = 1 + 3 * (i - 2)
  local v = redis.call('HMGET', h, 'sn', 'st')
  if tonumber(ARGV[b + 1]) > (tonumber(v[1]) or 0) then redis.call('HSET', h, 'sn', ARGV[b + 1]) end
  if tonumber(ARGV[b + 2]) > (tonumber(v[2]) or 0) then redis.call('HSET', h, 'st', ARGV[b + 2]) end
  redis.call('EXPIRE', h, ARGV[b + 3])
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
return #KEYS - 1
