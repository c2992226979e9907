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
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from nexus_extproc.ledger.base import (
    AlertRecord,
    AuditRecord,
    CalibrationSums,
    ForwardNote,
    Key,
    Ledger,
    PruneResult,
    ReapResult,
    ReserveResult,
    SpendAgg,
    SpendRecord,
    StoreUnavailable,
    Totals,
    decay,
    record_tokens,
    window_of,
)
from nexus_extproc.ledger.redis_batch import ScriptBatcher
from nexus_extproc.memo import BoundedMemo


def _lua(name: str) -> str:
    """The ledger's Lua scripts live beside this module as .lua files (ledger/lua/), each with its KEYS/ARGV."""
    return (resources.files(__package__) / "lua" / f"{name}.lua").read_text()


_UNRESERVE_FN = _lua("unreserve")  # shared by settle, release and reap
_RESERVE = _lua("reserve")
_SETTLE = _UNRESERVE_FN + _lua("settle")
_RELEASE = _UNRESERVE_FN + _lua("release")
_FORWARDED = _lua("forwarded")
_CORRECT = _lua("correct")
_REAP = _UNRESERVE_FN + _lua("reap")
_CALIBRATE = _lua("calibrate")
_TIME = _lua("time")  # on the node that owns the keys (in a cluster, the slot's master)
_PUT_SETTINGS = _lua("put_settings")
_ALERT = _lua("alert")
# KEYS: instance set ; ARGV: name, max. A member already, or room for one more: add it (atomic).
# KEYS: the instance set, the idle-expiring instances' sorted set (score: last claim, server clock); ARGV: name,
# max_instances, idle TTL in seconds (0: never expire, the set alone).
_CLAIM = """
local ttl = tonumber(ARGV[3])
if ttl == 0 then
  if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
  if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
  redis.call('SADD', KEYS[1], ARGV[1])
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. string.format('%.6f', now - ttl))
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], string.format('%.6f', now), ARGV[1])
redis.call('EXPIRE', KEYS[2], ttl + 86400)
return 1
"""

SETTLED_MARKER_TTL_S = 40 * 86400


def _agg_doc(a: SpendAgg) -> dict[str, object]:
    return {k: getattr(a, k) for k in a.__slots__}


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
        self._correct = self._r.register_script(_CORRECT)
        self._release = self._r.register_script(_RELEASE)
        self._reap = self._r.register_script(_REAP)
        self._forwarded = self._r.register_script(_FORWARDED)
        self._calibrate = self._r.register_script(_CALIBRATE)
        self._time = self._r.register_script(_TIME)
        self._put_settings = self._r.register_script(_PUT_SETTINGS)
        self._alert = self._r.register_script(_ALERT)
        self._claim = self._r.register_script(_CLAIM)
        # One pipeline per event-loop tick for the per-request scripts (not in a cluster: its pipelines split
        # by node, and every key here is in one slot anyway).
        self._batch = None if cluster else ScriptBatcher(self._r)  # type: ignore[arg-type]

    def _script(self, script, keys: list[str], args: list[object]):  # type: ignore[no-untyped-def]
        if self._batch is not None:
            return self._batch.run(script, keys, args)
        return script(keys=keys, args=args)

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
        if window_of(period) is None:
            s, r = await self._call(self._r.hmget(self._tkey(budget, period), "settled", "reserved"))
            return Totals(int(s or 0), int(r or 0))
        b = await self.buckets(budget, period)
        return Totals(sum(t.settled for t in b), sum(t.reserved for t in b))

    async def buckets(self, budget: str, period: str) -> list[Totals]:
        w = window_of(period)
        keys = [period] if w is None else [*w[1], period]
        pipe = self._r.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(self._tkey(budget, k), "settled", "reserved")
        rows = await self._call(pipe.execute())
        return [Totals(int(s or 0), int(r or 0)) for s, r in rows]

    async def reserve(self, req_id: str, keys: Sequence[Key], amount: int, expires_at: float,
                      caps: Sequence[int | None] | None = None,
                      forwarded: tuple[float, ForwardNote] | None = None, tokens: int = 0) -> ReserveResult:
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
        fwd: list[Any] = [forwarded[0], self._note_doc(forwarded[1])] if forwarded is not None else []
        out = await self._call(self._script(self._reserve, [f"{self._p}:r:{req_id}", f"{self._p}:rexp"],
                                            [req_id, expires_at, amount, self._p, packed, deadline, tokens, *fwd]))
        if int(out[0]) < 0:
            raise StoreUnavailable("redis: reserve reached the server after its deadline")
        totals = [Totals(int(out[1 + 2 * i]), int(out[2 + 2 * i])) for i in range(len(keys))]
        return ReserveResult(bool(int(out[0])), totals)

    @staticmethod
    def _settle_doc(req_id: str, items: Sequence[Key], cost: int, record: SpendRecord) -> str:
        return json.dumps({"req": req_id, "ts": record.ts, "model": record.model, "backend": record.backend,
                           "in": record.input_tokens, "out": record.output_tokens, "cost": cost,
                           "estimate": record.estimate, "source": record.source,
                           "budgets": [b for b, _ in items], "avoided": record.avoided,
                           "asked": record.model_requested, "task": record.task, "tags": record.tags,
                           "team": record.team, "agent": record.agent, "tool": record.tool,
                           "session": record.session,
                           "cr": record.cache_read_tokens, "or": record.output_reserved,
                           "st": int(record.streamed)}, separators=(",", ":"))

    async def settle(self, req_id: str, items: Sequence[Key], cost: int, record: SpendRecord) -> bool:
        day = record.ts // 86400
        keys = [f"{self._p}:r:{req_id}", f"{self._p}:rexp", f"{self._p}:s:{req_id}",
                f"{self._p}:settlement_count", f"{self._p}:log:{int(day)}"]
        fields = "\n".join(f"{b}\t{p}" for b, p in items)
        # An estimate's marker keeps what a later correction needs: its cost and token counts.
        marker = (f"estimate:{cost}:{record.input_tokens}:{record.output_tokens}:{record.cache_read_tokens}"
                  if record.source == "estimate" else "1")
        return bool(int(await self._call(self._script(
            self._settle, keys, [req_id, cost, self._p, SETTLED_MARKER_TTL_S,
                                 self._settle_doc(req_id, items, cost, record), fields, marker,
                                 record_tokens(record)]))))

    async def correct(self, req_id: str, keys: Sequence[Key], cost: int, record: SpendRecord) -> bool:
        """The settle marker says how the request was settled; the log gets a correction entry (`corr`) holding
        the differences, which reports add up without counting a second request."""
        fields = "\n".join(f"{b}\t{p}" for b, p in keys)
        day = int(record.ts // 86400)
        out = await self._call(self._script(
            self._correct, [f"{self._p}:s:{req_id}", f"{self._p}:log:{day}"],
            [self._p, cost, self._settle_doc(req_id, keys, cost, record), fields, SETTLED_MARKER_TTL_S]))
        return bool(int(out))

    async def release(self, req_id: str) -> int:
        keys = [f"{self._p}:r:{req_id}", f"{self._p}:rexp"]
        return int(await self._call(self._release(keys=keys, args=[req_id, self._p])))

    @staticmethod
    def _note_doc(note: ForwardNote) -> str:
        return json.dumps({"model": note.model, "backend": note.backend, "asked": note.model_requested,
                           "in": note.input_tokens, "task": note.task, "tags": note.tags}, separators=(",", ":"))

    async def mark_forwarded(self, req_id: str, at: float, note: ForwardNote) -> None:
        await self._call(self._script(self._forwarded, [f"{self._p}:r:{req_id}"], [at, self._note_doc(note)]))

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

    async def put_settings(self, budget: str, settings: dict[str, object] | None,
                           audit: list[AuditRecord]) -> None:
        await self._call(self._put_settings(
            keys=[f"{self._p}:settings", f"{self._p}:audit"],
            args=[budget, "" if settings is None else json.dumps(settings),
                  *(json.dumps([a.ts, a.actor, a.budget, a.field, a.old, a.new]) for a in audit)]))

    # Alerts: a hash id -> JSON document, ids from a counter. A handful per budget and period, so the list is
    # read whole and sorted here.
    async def record_alert(self, ts: float, budget: str, period: str, threshold: str, spend_micros: int,
                           limit_micros: int) -> int:
        alert_id = int(await self._call(self._r.incr(f"{self._p}:alert_seq")))
        doc = {"id": alert_id, "ts": ts, "budget": budget, "period": period, "threshold": threshold,
               "spend_micros": spend_micros, "limit_micros": limit_micros, "delivery": "pending", "attempts": 0,
               "acked_by": None, "acked_at": None}
        await self._call(self._r.hset(f"{self._p}:alerts", str(alert_id), json.dumps(doc)))
        return alert_id

    async def _alert_update(self, alert_id: int, mode: str, a: str, b: float) -> AlertRecord | None:
        raw = await self._call(self._alert(keys=[f"{self._p}:alerts"], args=[str(alert_id), mode, a, b]))
        return AlertRecord(**json.loads(raw)) if raw else None

    async def alert_delivered(self, alert_id: int, delivery: str, attempts: int) -> None:
        await self._alert_update(alert_id, "deliver", delivery, attempts)

    async def list_alerts(self, limit: int) -> list[AlertRecord]:
        raw = await self._call(self._r.hvals(f"{self._p}:alerts"))
        docs = sorted((json.loads(r) for r in raw), key=lambda d: -int(d["id"]))
        return [AlertRecord(**d) for d in docs[:limit]]

    async def ack_alert(self, alert_id: int, actor: str, at: float) -> AlertRecord | None:
        return await self._alert_update(alert_id, "ack", actor, at)

    async def claim_instance(self, parent: str, period: str, name: str, max_instances: int,
                             idle_ttl_s: int = 0) -> bool:
        keys = [f"{self._p}:inst:{parent}:{period}", f"{self._p}:instz:{parent}:{period}"]
        return bool(int(await self._call(self._claim(keys=keys, args=[name, max_instances, int(idle_ttl_s)]))))

    async def instances(self, parent: str, period: str) -> list[tuple[str, Totals]]:
        members = [*await self._call(self._r.smembers(f"{self._p}:inst:{parent}:{period}")),
                   *await self._call(self._r.zrange(f"{self._p}:instz:{parent}:{period}", 0, -1))]
        names = sorted({(n.decode() if isinstance(n, bytes) else n) for n in members})
        out: list[tuple[str, Totals]] = []
        for i in range(0, len(names), 500):
            chunk = names[i:i + 500]
            pipe = self._r.pipeline(transaction=False)
            for n in chunk:
                pipe.hmget(self._tkey(n, period), "settled", "reserved")
            for n, (s, r) in zip(chunk, await self._call(pipe.execute()), strict=True):
                out.append((n, Totals(int(s or 0), int(r or 0))))
        return out

    async def all_settings(self) -> dict[str, dict[str, object]]:
        raw = await self._call(self._r.hgetall(f"{self._p}:settings"))
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}

    async def append_audit(self, audit: list[AuditRecord]) -> None:
        if audit:
            await self._call(self._r.lpush(f"{self._p}:audit", *(json.dumps(
                [a.ts, a.actor, a.budget, a.field, a.old, a.new]) for a in audit)))

    async def audit_log(self, limit: int) -> list[AuditRecord]:
        rows = await self._call(self._r.lrange(f"{self._p}:audit", 0, max(0, limit - 1)))
        return [AuditRecord(*json.loads(r)) for r in rows]

    async def spend(self, start_ts: float, end_ts: float, per_budget: bool = True) -> list[SpendAgg]:
        end_ts = min(end_ts, time.time() + 86400)
        out: list[SpendAgg] = []
        days = [d for d in range(int(start_ts // 86400), int(end_ts // 86400) + 1) if d * 86400 < end_ts]
        # One pipelined pass: each day's roll-up and whether its log still exists.
        both = await self._per_day(days, lambda p, d: p.get(f"{self._p}:rollup:{d}").exists(f"{self._p}:log:{d}"))
        for raw, has_log in zip(both[0::2], both[1::2], strict=True):
            if raw is not None and not has_log:
                # A day retention rolled up: its aggregates, as they were computed from its log.
                out += [SpendAgg(**d) for d in json.loads(raw)["per_budget" if per_budget else "once"]]
        return sorted(out + await self._spend_logs(start_ts, end_ts, per_budget),
                      key=lambda a: (a.day, a.budget, a.model, a.model_requested, a.backend, a.task, a.tags, a.team,
                                     a.agent, a.tool, a.session))

    async def _spend_logs(self, start_ts: float, end_ts: float, per_budget: bool) -> list[SpendAgg]:
        # (budget, model, day, asked, backend, task, tags, team, agent) -> sums, the SQLite ledger's grain
        acc: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0] * 10)
        days = list(range(int(start_ts // 86400), int(end_ts // 86400) + 1))
        for entries in await self._per_day(days, lambda p, d: p.lrange(f"{self._p}:log:{d}", 0, -1)):
            for raw in entries:
                d = json.loads(raw)
                if not start_ts <= d["ts"] < end_ts:
                    continue
                day_s = datetime.fromtimestamp(d["ts"], UTC).strftime("%Y-%m-%d")
                for b in d.get("budgets", []) if per_budget else [""]:
                    a = acc[(b, d["model"], day_s, d.get("asked", ""), d.get("backend", ""), d.get("task", ""),
                             d.get("tags", ""), d.get("team", ""), d.get("agent", ""), d.get("tool", ""),
                             d.get("session", ""))]
                    one = 0 if d.get("corr") else 1  # a correction's entry is a difference, not a request
                    for i, v in enumerate((one, d["in"], d["out"], d["cost"], d["estimate"], d.get("avoided", 0),
                                           d["cost"] if d.get("source") == "reaped" else 0, d.get("cr", 0),
                                           d.get("or", 0), d.get("st", 0))):
                        a[i] += v
        return [SpendAgg(k[0], k[1], k[2], v[0], v[1], v[2], v[3], v[4], v[5], model_requested=k[3], reaped=v[6],
                         backend=k[4], task=k[5],
                         tags=k[6], cache_read_tokens=v[7], output_reserved=v[8], streamed=v[9], team=k[7],
                         agent=k[8], tool=k[9], session=k[10])
                for k, v in sorted(acc.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1], *kv[0][3:]))]

    async def _per_day(self, days: list[int], op: Callable[[Any, int], Any]) -> list[Any]:
        """One command per day, pipelined 500 at a time (a year's report is 365 round trips otherwise)."""
        out: list[Any] = []
        for i in range(0, len(days), 500):
            pipe = self._r.pipeline(transaction=False)
            for d in days[i:i + 500]:
                op(pipe, d)
            out += await self._call(pipe.execute())
        return out

    async def prune(self, settlements_before: float, alerts_before: float, now: float) -> PruneResult:
        """Each old day's log becomes one aggregate document, then the log goes (a crash in between leaves both:
        spend reads the log while it exists, so nothing counts twice). Days are looked for over the 5 years
        before the cutoff."""
        cutoff = int(settlements_before // 86400)
        days = list(range(cutoff - 5 * 366, cutoff))
        found = [d for d, e in zip(days, await self._per_day(days, lambda p, d: p.exists(f"{self._p}:log:{d}")),
                                   strict=True) if e]
        rolled = entries = 0
        for day in found:
            doc = {"per_budget": [_agg_doc(a) for a in await self._spend_logs(day * 86400, (day + 1) * 86400, True)],
                   "once": [_agg_doc(a) for a in await self._spend_logs(day * 86400, (day + 1) * 86400, False)]}
            entries += int(await self._call(self._r.llen(f"{self._p}:log:{day}")))
            await self._call(self._r.set(f"{self._p}:rollup:{day}", json.dumps(doc)))
            await self._call(self._r.delete(f"{self._p}:log:{day}"))
            rolled += 1
        old = [k for k, v in (await self._call(self._r.hgetall(f"{self._p}:alerts"))).items()
               if json.loads(v)["ts"] < alerts_before]
        if old:
            await self._call(self._r.hdel(f"{self._p}:alerts", *old))
        # Short-window buckets expire by themselves (reserve.lua).
        return PruneResult(rolled, entries, len(old), 0)

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
