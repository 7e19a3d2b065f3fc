if redis.call('HGET', KEYS[1], 'building') ~= ARGV[1] then return 0 end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'complete', ARGV[1], 'run_id', ARGV[2])
end
redis.call('HDEL', KEYS[1], 'building', 'building_runs')
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return tonumber(ARGV[3])
