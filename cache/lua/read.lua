
local complete, registry, upto = unpack(
  redis.call('HMGET', KEYS[1], 'complete', 'registry', 'rebuilt_to'))
if not registry then return false end
if not complete and not (upto and tonumber(ARGV[2]) <= tonumber(upto)) then return false end
local out = redis.call('ZRANGE', KEYS[2], ARGV[1], '+inf', 'BYSCORE')
table.insert(out, 1, registry)
return out
