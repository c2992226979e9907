-- Shared by settle, release and reap: move one request's reservations out of the totals, settling `settle_cost`
-- into each budget (`settle_tokens` into a token budget's, period "T:…"; 'held': what each held, as the reaper
-- charges; nil: nothing, a release).
local function unreserve(prefix, rkey, settle_cost, extra, settle_tokens)
  local held = redis.call('HGETALL', rkey)
  local targets = {}
  for i = 1, #extra do
    local f = extra[i]
    local sep = string.find(f, '\t', 1, true)
    targets[string.sub(f, 1, sep - 1)] = {string.sub(f, sep + 1), 0}
  end
  local n = 0
  for i = 1, #held, 2 do
    local f = held[i]
    local sep = string.find(f, '\t', 1, true)
    if sep then  -- "budget<TAB>period" = amount; `_fwd` and `_note` are the forwarded mark
      targets[string.sub(f, 1, sep - 1)] = {string.sub(f, sep + 1), tonumber(held[i + 1])}
      n = n + 1
    end
  end
  for budget, pa in pairs(targets) do
    local key = prefix .. ':t:' .. budget .. ':' .. pa[1]
    if settle_cost == 'held' then
      redis.call('HINCRBY', key, 'settled', pa[2])
    elseif settle_cost ~= nil then
      if string.sub(pa[1], 1, 2) == 'T:' then
        redis.call('HINCRBY', key, 'settled', settle_tokens or 0)
      else
        redis.call('HINCRBY', key, 'settled', settle_cost)
      end
    end
    if pa[2] ~= 0 then redis.call('HINCRBY', key, 'reserved', -pa[2]) end
  end
  redis.call('DEL', rkey)
  return n
end
