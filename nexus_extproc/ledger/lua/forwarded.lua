-- KEYS: r ; ARGV: at, note. Only while the reservation exists: a mark after its settle must not recreate it.
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], '_fwd', ARGV[1], '_note', ARGV[2]) end
return 1
