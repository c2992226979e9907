-- KEYS: r, rexp ; ARGV: req, expires_at, amount, prefix, budgets ("budget	period	cap" lines; cap -1: none),
-- deadline (unix seconds), tokens (what a token budget's key, period "T:…", holds instead of amount), then
-- optionally forwarded_at and its note (the reservation written already marked forwarded, as forwarded.lua would). The budgets travel as one string (not an argument each): redis-py encodes every
-- argument in Python. A call that reaches the server after the client gave up on it (Redis paused or
-- overloaded past the client's timeout) does nothing: otherwise it would hold a ghost reservation for its TTL.
local now = redis.call('TIME')
if tonumber(now[1]) + tonumber(now[2]) / 1000000 > tonumber(ARGV[6]) then return {-1} end
local items = {}
for line in string.gmatch(ARGV[5], '[^\n]+') do
  local b, p, cap = string.match(line, '^([^\t]+)\t([^\t]+)\t(-?%d+)$')
  local a = tonumber(ARGV[3])
  if string.sub(p, 1, 2) == 'T:' then a = tonumber(ARGV[7]) end
  table.insert(items, {b .. '\t' .. p, tonumber(cap), ARGV[4] .. ':t:' .. b .. ':' .. p, nil, a})
end
local seen = {}
local ok = 1
for i, it in ipairs(items) do
  local t = redis.call('HMGET', it[3], 'settled', 'reserved')
  seen[i] = {tonumber(t[1]) or 0, tonumber(t[2]) or 0}
  -- A rolling window's key (ledger/base.py window_of): its older buckets count too, and its bucket expires
  -- two days after it leaves the window.
  local head, w, n, idx = string.match(it[3], '^(.*:R(%d+)x(%d+)):(%d+)$')
  if head then
    for j = tonumber(idx) - tonumber(n) + 1, tonumber(idx) - 1 do
      local o = redis.call('HMGET', head .. ':' .. string.format('%012d', j), 'settled', 'reserved')
      seen[i][1] = seen[i][1] + (tonumber(o[1]) or 0)
      seen[i][2] = seen[i][2] + (tonumber(o[2]) or 0)
    end
    it[4] = tonumber(w) * (tonumber(n) + 1) + 172800
  end
  local secs = string.match(it[3], ':E(%d+):%d+$')  -- an `every` window's bucket: the same expiry
  if secs then it[4] = tonumber(secs) * 2 + 172800 end
  if it[2] >= 0 and seen[i][1] + seen[i][2] + it[5] > it[2] then ok = 0 end
end
local out = {ok}
local held = {}
for i, it in ipairs(items) do
  if ok == 1 then
    redis.call('HINCRBY', it[3], 'reserved', it[5])
    if it[4] then redis.call('EXPIRE', it[3], it[4]) end
    table.insert(held, it[1])
    table.insert(held, it[5])
    seen[i][2] = seen[i][2] + it[5]
  end
  table.insert(out, seen[i][1])
  table.insert(out, seen[i][2])
end
if ok == 1 then
  if ARGV[8] then
    table.insert(held, '_fwd')
    table.insert(held, ARGV[8])
    table.insert(held, '_note')
    table.insert(held, ARGV[9])
  end
  if #held > 0 then redis.call('HSET', KEYS[1], unpack(held)) end
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
return out
