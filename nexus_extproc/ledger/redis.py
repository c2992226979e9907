"""Redis ledger: one shared budget for many replicas.

Every mutation is a Lua script, so the limit check and the reservation are one atomic step on the server,
and money moves with `HINCRBY` on integers (never `INCRBYFLOAT`, whose 17-digit floats drift). Keys:
`{p}:t:{budget}:{period}` totals hash, `{p}:r:{req}` the request's reservations, `{p}:rexp` expiry index,
`{p}:s:{req}` settled marker (idempotence), `{p}:period:{budget}:{period}` rollover marker.

Redis Cluster (`store.cluster: true`): the prefix becomes a hash tag (`{nexus}:t:…`), so every key of one
deployment lives in one slot and each script stays one atomic call on one master, multi-budget reservations
included. The cluster then gives failover and shared operation, not ledger sharding: one master runs every
reserve and settle. Splitting budgets over slots would need a two-phase reserve with compensation across
masters; one master's script throughput is far above what the ext_proc servers in front of it can send
(bench/budgets.py --store redis), so the simpler atomic design was chosen.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from nexus_extproc.ledger.base import (
    AuditRecord,
    CalibrationSums,
    ForwardNote,
    Key,
    Ledger,
    ReapResult,
    ReserveResult,
    SpendAgg,
    SpendRecord,
    StoreUnavailable,
    Totals,
    decay,
)
from nexus_extproc.memo import BoundedMemo

_RESERVE = """
-- KEYS: r, rexp ; ARGV: req, expires_at, amount, prefix, budgets ("budget\tperiod\tcap" lines; cap -1: none),
-- deadline (unix seconds). The budgets travel as one string (not an argument each): redis-py encodes every
-- argument in Python. A call that reaches the server after the client gave up on it (Redis paused or
-- overloaded past the client's timeout) does nothing: otherwise it would hold a ghost reservation for its TTL.
local now = redis.call('TIME')
if tonumber(now[1]) + tonumber(now[2]) / 1000000 > tonumber(ARGV[6]) then return {-1} end
local amt = tonumber(ARGV[3])
local items = {}
for line in string.gmatch(ARGV[5], '[^\\n]+') do
  local b, p, cap = string.match(line, '^([^\\t]+)\\t([^\\t]+)\\t(-?%d+)$')
  table.insert(items, {b .. '\\t' .. p, tonumber(cap), ARGV[4] .. ':t:' .. b .. ':' .. p})
end
local seen = {}
local ok = 1
for i, it in ipairs(items) do
  local t = redis.call('HMGET', it[3], 'settled', 'reserved')
  seen[i] = {tonumber(t[1]) or 0, tonumber(t[2]) or 0}
  if it[2] >= 0 and seen[i][1] + seen[i][2] + amt > it[2] then ok = 0 end
end
local out = {ok}
local held = {}
for i, it in ipairs(items) do
  if ok == 1 then
    redis.call('HINCRBY', it[3], 'reserved', amt)
    table.insert(held, it[1])
    table.insert(held, amt)
    seen[i][2] = seen[i][2] + amt
  end
  table.insert(out, seen[i][1])
  table.insert(out, seen[i][2])
end
if ok == 1 then
  if #held > 0 then redis.call('HSET', KEYS[1], unpack(held)) end
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
return out
"""

# Shared by settle, release and reap: move one request's reservations out of the totals.
_UNRESERVE_FN = """
local function unreserve(prefix, rkey, settle_cost, extra)
  local held = redis.call('HGETALL', rkey)
  local targets = {}
  for i = 1, #extra do
    local f = extra[i]
    local sep = string.find(f, '\\t', 1, true)
    targets[string.sub(f, 1, sep - 1)] = {string.sub(f, sep + 1), 0}
  end
  local n = 0
  for i = 1, #held, 2 do
    local f = held[i]
    local sep = string.find(f, '\\t', 1, true)
    if sep then  -- "budget<TAB>period" = amount; `_fwd` and `_note` are the forwarded mark
      targets[string.sub(f, 1, sep - 1)] = {string.sub(f, sep + 1), tonumber(held[i + 1])}
      n = n + 1
    end
  end
  for budget, pa in pairs(targets) do
    local key = prefix .. ':t:' .. budget .. ':' .. pa[1]
    if settle_cost ~= nil then redis.call('HINCRBY', key, 'settled', settle_cost) end
    if pa[2] ~= 0 then redis.call('HINCRBY', key, 'reserved', -pa[2]) end
  end
  redis.call('DEL', rkey)
  return n
end
"""

_SETTLE = _UNRESERVE_FN + """
-- KEYS: r, rexp, settled-marker, count, day ; ARGV: req, cost, prefix, marker_ttl, record_json,
-- budgets ("budget\tperiod" lines)
if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[4]) then return 0 end
local extra = {}
for line in string.gmatch(ARGV[6], '[^\\n]+') do table.insert(extra, line) end
unreserve(ARGV[3], KEYS[1], tonumber(ARGV[2]), extra)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('INCR', KEYS[4])
redis.call('RPUSH', KEYS[5], ARGV[5])
return 1
"""

_RELEASE = _UNRESERVE_FN + """
redis.call('ZREM', KEYS[2], ARGV[1])
return unreserve(ARGV[2], KEYS[1], nil, {})
"""

_FORWARDED = """
-- KEYS: r ; ARGV: at, note. Only while the reservation exists: a mark after its settle must not recreate it.
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], '_fwd', ARGV[1], '_note', ARGV[2]) end
return 1
"""

# KEYS: rexp, count ; ARGV: now, prefix, marker_ttl. Forwarded reservations are settled at their reserved amount
# (their request went upstream, so the provider bills it), with a settled marker and a report line as a settle
# has; the rest are released. Returns {released, charged, charged_micros}.
_REAP = _UNRESERVE_FN + """
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
      if sep then amount = tonumber(held[i + 1]); table.insert(budgets, string.sub(held[i], 1, sep - 1)) end
    end
    unreserve(ARGV[2], rkey, amount, {})
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
"""

# KEYS: calibration hash ; ARGV: now, half_life_s, then key, provider, ours, tool_calls, n per delta.
# Decay and add in one step on the server, so replicas flushing at once never lose each other's samples.
# Stored as "provider ours tool_calls n updated" strings; floats are fine here: a ratio, not money.
_CALIBRATE = """
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
"""

SETTLED_MARKER_TTL_S = 40 * 86400


_TIME = "return redis.call('TIME')"  # on the node that owns the keys (in a cluster, the slot's master)

# KEYS: settings, audit ; ARGV: budget, settings json, then one audit json each. One atomic step, also in a
# cluster (a MULTI pipeline is not portable there).
_PUT_SETTINGS = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
for i = 3, #ARGV do redis.call('LPUSH', KEYS[2], ARGV[i]) end
return 1
"""


class RedisLedger(Ledger):
    def __init__(self, url: str, key_prefix: str = "nexus", timeout_ms: int = 250, cluster: bool = False) -> None:
        self._timeout = timeout_ms / 1000
        self._r: aioredis.Redis | RedisCluster
        if cluster:
            self._r = RedisCluster.from_url(url, socket_timeout=self._timeout,
                                            socket_connect_timeout=self._timeout, decode_responses=True)
            self._p = "{" + key_prefix + "}"  # one hash tag: one slot, every script atomic on one master
            self._uninitialized: asyncio.Lock | None = asyncio.Lock()
        else:
            self._r = aioredis.Redis.from_url(url, socket_timeout=self._timeout,
                                              socket_connect_timeout=self._timeout, decode_responses=True)
            self._p = key_prefix
            self._uninitialized = None
        self._clock_offset: float | None = None
        self._packed: BoundedMemo[tuple[tuple[Key, ...], tuple[int | None, ...] | None], str] = BoundedMemo()
        self._reserve = self._r.register_script(_RESERVE)
        self._settle = self._r.register_script(_SETTLE)
        self._release = self._r.register_script(_RELEASE)
        self._reap = self._r.register_script(_REAP)
        self._forwarded = self._r.register_script(_FORWARDED)
        self._calibrate = self._r.register_script(_CALIBRATE)
        self._time = self._r.register_script(_TIME)
        self._put_settings = self._r.register_script(_PUT_SETTINGS)

    async def _call(self, coro):  # type: ignore[no-untyped-def]
        try:
            if self._uninitialized is not None:
                await self._initialize()
            return await asyncio.wait_for(coro, self._timeout)
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}") from None

    async def _initialize(self) -> None:
        """A cluster client's first commands, run concurrently, race its slot discovery (redis-py connects a
        node while another command writes to it); discover once, under a lock, before anything else."""
        assert self._uninitialized is not None
        async with self._uninitialized:
            if self._uninitialized is not None and isinstance(self._r, RedisCluster):
                await asyncio.wait_for(self._r.initialize(), max(self._timeout, 2.0))
                self._uninitialized = None

    def _tkey(self, budget: str, period: str) -> str:
        return f"{self._p}:t:{budget}:{period}"

    async def totals(self, budget: str, period: str) -> Totals:
        s, r = await self._call(self._r.hmget(self._tkey(budget, period), "settled", "reserved"))
        return Totals(int(s or 0), int(r or 0))

    async def reserve(self, req_id: str, keys: Sequence[Key], amount: int, expires_at: float,
                      caps: Sequence[int | None] | None = None) -> ReserveResult:
        caps_t = None if caps is None else tuple(caps)
        kt = keys if type(keys) is tuple else tuple(keys)
        packed = self._packed.get((kt, caps_t))
        if packed is None:
            packed = "\n".join(f"{b}\t{p}\t{-1 if caps_t is None or caps_t[k] is None else caps_t[k]}"
                               for k, (b, p) in enumerate(keys))
            self._packed.put((kt, caps_t), packed)
        if self._clock_offset is None:
            # The deadline is in the server's clock: a replica's clock skew must not refuse (or extend) it.
            secs, micros = (int(x) for x in await self._call(self._time(keys=[f"{self._p}:rexp"])))
            self._clock_offset = secs + micros / 1e6 - time.time()
        deadline = time.time() + self._clock_offset + self._timeout
        out = await self._call(self._reserve(keys=[f"{self._p}:r:{req_id}", f"{self._p}:rexp"],
                                             args=[req_id, expires_at, amount, self._p, packed, deadline]))
        if int(out[0]) < 0:
            raise StoreUnavailable("redis: reserve reached the server after its deadline")
        totals = [Totals(int(out[1 + 2 * i]), int(out[2 + 2 * i])) for i in range(len(keys))]
        return ReserveResult(bool(int(out[0])), totals)

    async def settle(self, req_id: str, items: Sequence[Key], cost: int, record: SpendRecord) -> bool:
        day = record.ts // 86400
        keys = [f"{self._p}:r:{req_id}", f"{self._p}:rexp", f"{self._p}:s:{req_id}",
                f"{self._p}:settlement_count", f"{self._p}:log:{int(day)}"]
        doc = json.dumps({"req": req_id, "ts": record.ts, "model": record.model, "backend": record.backend,
                          "in": record.input_tokens, "out": record.output_tokens, "cost": cost,
                          "estimate": record.estimate, "source": record.source,
                          "budgets": [b for b, _ in items], "avoided": record.avoided,
                          "asked": record.model_requested}, separators=(",", ":"))
        fields = "\n".join(f"{b}\t{p}" for b, p in items)
        return bool(int(await self._call(self._settle(
            keys=keys, args=[req_id, cost, self._p, SETTLED_MARKER_TTL_S, doc, fields]))))

    async def release(self, req_id: str) -> int:
        keys = [f"{self._p}:r:{req_id}", f"{self._p}:rexp"]
        return int(await self._call(self._release(keys=keys, args=[req_id, self._p])))

    async def mark_forwarded(self, req_id: str, at: float, note: ForwardNote) -> None:
        doc = json.dumps({"model": note.model, "backend": note.backend, "asked": note.model_requested,
                          "in": note.input_tokens}, separators=(",", ":"))
        await self._call(self._forwarded(keys=[f"{self._p}:r:{req_id}"], args=[at, doc]))

    async def reap(self, now: float) -> ReapResult:
        out = await self._call(self._reap(keys=[f"{self._p}:rexp", f"{self._p}:settlement_count"],
                                          args=[now, self._p, SETTLED_MARKER_TTL_S]))
        return ReapResult(int(out[0]), int(out[1]), int(out[2]))

    async def first_seen(self, budget: str, period: str, now: float) -> bool:
        key = f"{self._p}:period:{budget}:{period}"
        return bool(await self._call(self._r.set(key, str(now), nx=True)))

    async def set_meta(self, key: str, value: str) -> None:
        await self._call(self._r.hset(f"{self._p}:meta", key, value))

    async def get_meta(self, key: str) -> str | None:
        v = await self._call(self._r.hget(f"{self._p}:meta", key))
        return None if v is None else str(v)

    async def settlement_count(self) -> int:
        return int(await self._call(self._r.get(f"{self._p}:settlement_count")) or 0)

    async def get_settings(self, budget: str) -> dict[str, object] | None:
        v = await self._call(self._r.hget(f"{self._p}:settings", budget))
        return json.loads(v) if v else None

    async def put_settings(self, budget: str, settings: dict[str, object], audit: list[AuditRecord]) -> None:
        await self._call(self._put_settings(
            keys=[f"{self._p}:settings", f"{self._p}:audit"],
            args=[budget, json.dumps(settings),
                  *(json.dumps([a.ts, a.actor, a.budget, a.field, a.old, a.new]) for a in audit)]))

    async def audit_log(self, limit: int) -> list[AuditRecord]:
        rows = await self._call(self._r.lrange(f"{self._p}:audit", 0, max(0, limit - 1)))
        return [AuditRecord(*json.loads(r)) for r in rows]

    async def spend(self, start_ts: float, end_ts: float) -> list[SpendAgg]:
        acc: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0])
        end_ts = min(end_ts, time.time() + 86400)
        for day in range(int(start_ts // 86400), int(end_ts // 86400) + 1):
            for raw in await self._call(self._r.lrange(f"{self._p}:log:{day}", 0, -1)):
                d = json.loads(raw)
                if not start_ts <= d["ts"] < end_ts:
                    continue
                day_s = datetime.fromtimestamp(d["ts"], UTC).strftime("%Y-%m-%d")
                for b in d.get("budgets", []):
                    a = acc[(b, d["model"], day_s, d.get("asked", ""))]
                    a[0] += 1
                    a[1] += d["in"]
                    a[2] += d["out"]
                    a[3] += d["cost"]
                    a[4] += d["estimate"]
                    a[5] += d.get("avoided", 0)
                    a[6] += d["cost"] if d.get("source") == "reaped" else 0
        return [SpendAgg(b, m, day, v[0], v[1], v[2], v[3], v[4], v[5], model_requested=asked, reaped=v[6])
                for (b, m, day, asked), v in sorted(acc.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1],
                                                                                 kv[0][3]))]

    async def merge_calibration(self, deltas: dict[str, CalibrationSums], now: float,
                                half_life_s: float) -> dict[str, CalibrationSums]:
        args: list[str | float] = [now, half_life_s]
        for key, d in deltas.items():
            args.extend((key, *d))
        flat = await self._call(self._calibrate(keys=[f"{self._p}:calibration"], args=args))
        out: dict[str, CalibrationSums] = {}
        for i in range(0, len(flat), 2):
            k = flat[i].decode() if isinstance(flat[i], bytes) else flat[i]
            v = flat[i + 1].decode() if isinstance(flat[i + 1], bytes) else flat[i + 1]
            p, o, t, n, u = (float(x) for x in v.split(" "))
            out[k] = decay((p, o, t, n), now - u, half_life_s)
        return out

    async def reset_calibration(self) -> int:
        n = await self._call(self._r.hlen(f"{self._p}:calibration"))
        await self._call(self._r.delete(f"{self._p}:calibration"))
        return int(n)

    async def close(self) -> None:
        await self._r.aclose()
