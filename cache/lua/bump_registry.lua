
local cur = redis.call('HGET', KEYS[1], 'registry')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'registry', ARGV[1])
return 1
