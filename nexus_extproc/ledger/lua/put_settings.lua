-- KEYS: settings, audit ; ARGV: budget, settings json ('' drops the runtime setting), then one audit json each.
-- One atomic step, also in a cluster (a MULTI pipeline is not portable there).
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
for i = 3, #ARGV do redis.call('LPUSH', KEYS[2], ARGV[i]) end
return 1
