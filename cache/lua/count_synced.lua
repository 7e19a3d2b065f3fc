
if not redis.call('HGET', KEYS[1], 'complete') then return false end
return redis.call('ZCOUNT', KEYS[2], ARGV[1], '+inf')
