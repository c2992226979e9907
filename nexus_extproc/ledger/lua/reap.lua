-- KEYS: rexp, count ; ARGV: now, prefix, marker_ttl. Forwarded reservations are settled at their reserved amount
-- (their request went upstream, so the provider bills it), with a settled marker and a report line as a settle
-- has; the rest are released. Returns {released, charged, charged_micros}.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)
local released, charged, micros = 0, 0, 0
for _, id in ipairs(ids) do
  local rkey = ARGV[2] .. ':r:' .. id
  local fwd = redis.call('HMGET', rkey, '_fwd', '_note')
  if fwd[1] and redis.call('SET', ARGV[2] .. ':s:' .. id, '1', 'NX', 'EX', ARGV[3]) then
    local held = redis.call('HGETALL', rkey)
    local amount, budgets = 0, {}
    for i = 1, #held, 2 do
      local sep = string.find(held[i], '\t', 1, true)
      if sep then
        -- the request's cost is what a dollar budget held (a token budget's holds tokens)
        if string.sub(held[i], sep + 1, sep + 2) ~= 'T:' then amount = tonumber(held[i + 1]) end
        table.insert(budgets, string.sub(held[i], 1, sep - 1))
      end
    end
    unreserve(ARGV[2], rkey, 'held', {})
    local note = cjson.decode(fwd[2] or '{}')
    note['req'] = id; note['ts'] = tonumber(ARGV[1]); note['cost'] = amount; note['estimate'] = amount
    note['source'] = 'reaped'; note['budgets'] = budgets; note['out'] = 0; note['avoided'] = 0
    redis.call('INCR', KEYS[2])
    redis.call('RPUSH', ARGV[2] .. ':log:' .. math.floor(tonumber(ARGV[1]) / 86400), cjson.encode(note))
    charged = charged + 1
    micros = micros + amount
  else
    unreserve(ARGV[2], rkey, nil, {})
    released = released + 1
  end
  redis.call('ZREM', KEYS[1], id)
end
return {released, charged, micros}
