
if redis.call('HGET', KEYS[1], 'building') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'complete', ARGV[1])
redis.call('HDEL', KEYS[1], 'building', 'rebuilt_to')
return 1
