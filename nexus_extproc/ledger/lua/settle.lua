-- KEYS: r, rexp, settled-marker, count, day ; ARGV: req, cost, prefix, marker_ttl, record_json,
-- budgets ("budget	period" lines), marker (what correct.lua reads: "estimate:cost:in:out:cache_read", or "1"),
-- tokens (what a token budget counts: input + output)
-- An estimate settles only a request still reserved (another process may have settled or released it).
if ARGV[7] and string.sub(ARGV[7], 1, 9) == 'estimate:' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if not redis.call('SET', KEYS[3], ARGV[7] or '1', 'NX', 'EX', ARGV[4]) then return 0 end
local extra = {}
for line in string.gmatch(ARGV[6], '[^\n]+') do table.insert(extra, line) end
unreserve(ARGV[3], KEYS[1], tonumber(ARGV[2]), extra, tonumber(ARGV[8]))
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('INCR', KEYS[4])
redis.call('RPUSH', KEYS[5], ARGV[5])
return 1
