if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'building') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'building', ARGV[2])
  return 1
end
redis.call('HDEL', KEYS[1], 'rebuilt_to')
redis.call('HSET', KEYS[1], 'building', ARGV[2])
return 0
