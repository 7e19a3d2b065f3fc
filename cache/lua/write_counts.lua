
local v = redis.call('ZSCORE', KEYS[1], '#v')
if v and -tonumber(v) >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZADD', KEYS[1], -tonumber(ARGV[1]), '#v')
for i = 3, #ARGV, 2 do redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i]) end
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
