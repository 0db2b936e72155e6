-- Spend the ledger holds for current windows, brought into counters that lack it.
--
-- KEYS      counters
-- ARGV      per counter: spent nusd, spent tokens (from the ledger), seconds it lives on
--
-- A max, not a sum: replicas that seed at once, or a restart onto counters that are already
-- right, count nothing twice; a Redis that was flushed or is new gets the ledger's figures.
for i, h in ipairs(KEYS) do
  local b = 3 * (i - 1)
  local v = redis.call('HMGET', h, 'sn', 'st')
  if tonumber(ARGV[b + 1]) > (tonumber(v[1]) or 0) then redis.call('HSET', h, 'sn', ARGV[b + 1]) end
  if tonumber(ARGV[b + 2]) > (tonumber(v[2]) or 0) then redis.call('HSET', h, 'st', ARGV[b + 2]) end
  redis.call('EXPIRE', h, ARGV[b + 3])
end
return #KEYS
