-- KEYS: calibration hash ; ARGV: now, half_life_s, then key, provider, ours, tool_calls, n per delta.
-- Decay and add in one step on the server, so replicas flushing at once never lose each other's samples.
-- Stored as "provider ours tool_calls n updated" strings; floats are fine here: a ratio, not money.
local now = tonumber(ARGV[1])
local hl = tonumber(ARGV[2])
for i = 3, #ARGV, 5 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  local p, o, t, n = 0, 0, 0, 0
  if old then
    local a, b, c, d, u = string.match(old, '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
    local f = 0.5 ^ (math.max(0, now - tonumber(u)) / hl)
    p, o, t, n = tonumber(a) * f, tonumber(b) * f, tonumber(c) * f, tonumber(d) * f
  end
  p = p + tonumber(ARGV[i + 1]); o = o + tonumber(ARGV[i + 2])
  t = t + tonumber(ARGV[i + 3]); n = n + tonumber(ARGV[i + 4])
  redis.call('HSET', KEYS[1], ARGV[i], string.format('%.17g %.17g %.17g %.17g %.17g', p, o, t, n, now))
end
return redis.call('HGETALL', KEYS[1])
