redis.call('ZREM', KEYS[2], ARGV[1])
return unreserve(ARGV[2], KEYS[1], nil, {})
