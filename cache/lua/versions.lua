
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('ZSCORE', KEYS[i], 'v')
end
return out
