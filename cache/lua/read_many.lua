
local metas = tonumber(ARGV[2])
local highest = tonumber(ARGV[3])
local newest = 0
for i = 1, metas do
  local complete, registry, upto = unpack(
    redis.call('HMGET', KEYS[i], 'complete', 'registry', 'rebuilt_to'))
  if not registry then return false end
  if not complete and not (upto and highest <= tonumber(upto)) then return false end
  newest = math.max(newest, tonumber(registry))
end
local out = {newest}
for i = metas + 1, #KEYS do
  out[i - metas + 1] = redis.call('ZRANGE', KEYS[i], ARGV[1], '+inf', 'BYSCORE')
end
return out
