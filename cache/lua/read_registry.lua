
return {redis.call('HGET', KEYS[1], 'registry'), redis.call('HGETALL', KEYS[2])}
