
local a = 1
for i = 1, #KEYS do
  local expire_at = ARGV[a]
  local first = a + 2
  local last = a + 1 + tonumber(ARGV[a + 1])
  local cur = redis.call('ZSCORE', KEYS[i], 'v')
  if not cur or tonumber(cur) > tonumber(ARGV[first]) then
    if cur then redis.call('DEL', KEYS[i]) end
    for j = first, last, 1000 do
      redis.call('ZADD', KEYS[i], unpack(ARGV, j, math.min(j + 999, last)))
    end
    if expire_at ~= '0' then redis.call('PEXPIREAT', KEYS[i], expire_at) end
  end
  a = last + 1
end
return 1
