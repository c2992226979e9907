-- KEYS: settled-marker, day-log ; ARGV: prefix, cost, record_json (the corrected settlement, as settle.lua logs it),
-- budgets ("budget	period" lines), marker_ttl. Only a settlement made at the estimate (its marker says
-- "estimate:cost:in:out:cache_read") is corrected, once: each budget's settled total moves by the difference, and
-- the log gets the record with `corr` set and the differences of cost and tokens, so reports add them up as one
-- request.
local m = redis.call('GET', KEYS[1])
if not m then return 0 end
local old, oin, oout, ocr = string.match(m, '^estimate:(%d+):(%d+):(%d+):(%d+)$')
if not old then return 0 end
local delta = tonumber(ARGV[2]) - tonumber(old)
local doc = cjson.decode(ARGV[3])
local tdelta = doc['in'] + doc['out'] - tonumber(oin) - tonumber(oout)  -- a token budget's difference
redis.call('SET', KEYS[1], 'corrected', 'EX', ARGV[5])
for line in string.gmatch(ARGV[4], '[^\n]+') do
  local b, p = string.match(line, '^([^\t]+)\t([^\t]+)$')
  local d = delta
  if string.sub(p, 1, 2) == 'T:' then d = tdelta end
  redis.call('HINCRBY', ARGV[1] .. ':t:' .. b .. ':' .. p, 'settled', d)
end
doc['corr'] = 1
doc['cost'] = delta
doc['in'] = doc['in'] - tonumber(oin)
doc['out'] = doc['out'] - tonumber(oout)
doc['cr'] = doc['cr'] - tonumber(ocr)
doc['estimate'] = 0
doc['or'] = 0
doc['st'] = 0
redis.call('RPUSH', KEYS[2], cjson.encode(doc))
return 1
