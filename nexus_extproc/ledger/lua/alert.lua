-- KEYS: alerts ; ARGV: id, mode ("ack" | "deliver"), a, b. Atomic read-modify-write of one alert document:
-- ack sets acked_by = a, acked_at = b unless already acknowledged (the first stands); deliver sets
-- delivery = a, attempts = b. Returns the document, or false for an unknown id.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
local doc = cjson.decode(raw)
if ARGV[2] == 'ack' then
  if doc['acked_by'] == nil or doc['acked_by'] == cjson.null then
    doc['acked_by'] = ARGV[3]; doc['acked_at'] = tonumber(ARGV[4])
  end
else
  doc['delivery'] = ARGV[3]; doc['attempts'] = tonumber(ARGV[4])
end
raw = cjson.encode(doc)
redis.call('HSET', KEYS[1], ARGV[1], raw)
return raw
