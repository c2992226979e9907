"""Budget service: the policy decision made safe by the ledger, for every budget a request falls under.

`admit` reserves the request's estimate in all its budgets at once (one store round trip; caps where the
budget's action blocks), reads each budget's status from the totals that reservation saw, and lets the
strictest budget decide. Only when the decision changes the target (reroute) or refuses does it release and
redo. A capped reservation that loses the race is refused atomically by the store, all or nothing across the
budgets, and that budget is then treated as at its hard limit. So two requests never both see room for one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo

from nexus_extproc.apis.errors import budget_exceeded, store_unavailable
from nexus_extproc.budget.alerts import AlertSender, alert_payload
from nexus_extproc.budget.forecast import Forecast, forecast
from nexus_extproc.budget.periods import Period, period_for
from nexus_extproc.budget.policy import (
    STATUS_CODE,
    Action,
    BudgetView,
    Decision,
    HardAction,
    PolicyInput,
    Target,
    decide,
)
from nexus_extproc.budget.scopes import RequestFacts, matches
from nexus_extproc.config import BudgetDefConfig, NexusConfig, ScopeConfig
from nexus_extproc.ledger import AuditRecord, ForwardNote, Key, Ledger, SpendRecord, StoreUnavailable, Totals
from nexus_extproc.ledger.outbox import Outbox
from nexus_extproc.metering.money import format_usd, usd_to_micros
from nexus_extproc.ops import metrics

log = logging.getLogger("nexus_extproc.budget.service")

GLOBAL_BUDGET = "global"
Clock = Callable[[], datetime]
_ROLLOVER_EVENT = {"daily": "day_rollover", "weekly": "week_rollover", "monthly": "month_rollover"}
_ACTION_RANK = {Action.ALLOW: 0, Action.REROUTE: 1, Action.REJECT: 2}


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Settings:
    """A budget's effective settings: config values, overridden at runtime through the admin API."""

    limit_micros: int
    soft_limit_percent: Decimal
    hard_limit_action: HardAction
    override_limit_micros: int | None = None
    override_until: float | None = None  # unix seconds; the override reverts by itself after this
    soft_bp: int = field(init=False, repr=False)  # soft limit in basis points, for integer compares

    def __post_init__(self) -> None:
        self.soft_bp = int(self.soft_limit_percent * 100)

    def limit_at(self, now: float) -> int:
        if self.override_limit_micros is not None and self.override_until is not None and now < self.override_until:
            return self.override_limit_micros
        return self.limit_micros

    def to_doc(self) -> dict[str, object]:
        return {"limit_micros": self.limit_micros, "soft_limit_percent": str(self.soft_limit_percent),
                "hard_limit_action": self.hard_limit_action, "override_limit_micros": self.override_limit_micros,
                "override_until": self.override_until}


@dataclass(slots=True)
class BudgetDef:
    """One budget at run time: its config plus the settings the admin API may have changed."""

    name: str
    scope: ScopeConfig | None
    period_kind: str
    tz: ZoneInfo
    base: Settings
    thresholds: list[Decimal]
    settings: Settings = field(init=False)

    thresholds_bp: list[int] = field(init=False)  # thresholds in basis points, for integer compares
    _period: Period | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.settings = self.base
        self.thresholds_bp = [int(t * 100) for t in self.thresholds]

    @classmethod
    def from_config(cls, c: BudgetDefConfig) -> BudgetDef:
        return cls(c.name, None if c.scope == "global" else cast(ScopeConfig, c.scope), c.period,
                   ZoneInfo(c.timezone), Settings(usd_to_micros(c.limit_usd), c.soft_limit_percent,
                                                  c.hard_limit_action), list(c.alert_thresholds))

    def period(self, now: datetime) -> Period:
        """Cached until the period ends: computing calendar boundaries per request is wasted work."""
        p = self._period
        if p is None or not p.start <= now < p.end:
            p = self._period = period_for(self.period_kind, now, self.tz)  # type: ignore[arg-type]
        return p


@dataclass(slots=True)
class Admission:
    decision: Decision
    view: BudgetView | None  # the deciding budget's view
    items: Sequence[Key] = ()  # (budget, period) reserved against
    reserved: int = 0
    outbox: bool = False  # store was down and store_failure=open: settle into the outbox
    budget: str | None = None  # the budget whose status decided
    reset_in_s: int = 0


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A budget's standing right now, for /v1/stats, the admin API and the gauges."""

    defn: BudgetDef
    period: Period
    view: BudgetView
    forecast: Forecast


@dataclass(slots=True)
class _Plan:
    """What a request's budgets look like until one of their periods ends, an override lapses or a setting
    changes: matched once per distinct request facts, so a request pays per budget only for integer compares."""

    defs: list[BudgetDef]
    names: tuple[str, ...]
    periods: list[Period]
    items: tuple[Key, ...]  # (budget, period key); one object per plan, which the ledger caches its shape by
    limits: list[int]
    soft: list[int]  # used * 10_000 below this is Normal (soft_bp * limit)
    alert_at: list[int]  # used * 10_000 at or above this crosses the lowest alert threshold
    caps: list[int | None]  # the limit where the hard action blocks, None for warn
    capped: bool  # any of them blocks at its limit
    valid_from: float
    valid_until: float
    gen: int
    next_sweep: float = 0.0  # next forecast check for these budgets (at most every 10 s)
    observed: bool = False  # these periods' rollover has been recorded in the store


class BudgetService:
    def __init__(self, config: NexusConfig, ledger: Ledger | None, clock: Clock = utc_now,
                 alerts: AlertSender | None = None) -> None:
        self.config = config
        self.budget = config.budget  # the legacy single block, for its options
        self.defs = [BudgetDef.from_config(c) for c in config.budget_defs()]
        self.by_name = {d.name: d for d in self.defs}
        self.ledger = ledger
        self.clock = clock
        self.alerts = alerts or AlertSender(config.alerts)
        self.outbox = Outbox(config.store.outbox_path)
        self.always_headers = bool(config.budget and config.budget.always_send_status_headers)
        self._seen_periods: dict[str, str] = {}
        self._fired: set[tuple[str, str, str]] = set()
        self._forecast_checked: dict[str, float] = {}
        self._plans: dict[RequestFacts, _Plan] = {}
        self._settings_gen = 0  # bumped on every settings change; plans built before it are rebuilt
        self.last_totals: dict[str, Totals] = {d.name: Totals(0, 0) for d in self.defs}
        self.last_status: dict[str, str] = {d.name: "Normal" for d in self.defs}
        self._not_normal: set[str] = set()  # budgets whose last status was not Normal (the fast path's check)

    @property
    def enabled(self) -> bool:
        return bool(self.defs) and self.ledger is not None

    @property
    def settings(self) -> Settings:
        """The global budget's settings (legacy single-budget callers)."""
        return self.by_name[GLOBAL_BUDGET].settings if GLOBAL_BUDGET in self.by_name else self.defs[0].settings

    def period(self, name: str = GLOBAL_BUDGET) -> Period:
        d = self.by_name.get(name) or self.defs[0]
        return d.period(self.clock())

    def view_of(self, d: BudgetDef, t: Totals) -> BudgetView:
        s = d.settings
        return BudgetView(s.limit_at(self.clock().timestamp()), t.settled, t.reserved, s.soft_limit_percent,
                          s.hard_limit_action)

    # ---- settings ------------------------------------------------------------------------------

    async def load_settings(self) -> None:
        """Runtime changes made through the admin API (by any process) win over the config file."""
        if self.ledger is None:
            return
        for d in self.defs:
            doc = await self.ledger.get_settings(d.name)
            if doc:
                new = Settings(
                    int(cast(Any, doc["limit_micros"])), Decimal(str(doc["soft_limit_percent"])),
                    cast(HardAction, doc["hard_limit_action"]),
                    None if doc.get("override_limit_micros") is None else int(cast(Any, doc["override_limit_micros"])),
                    None if doc.get("override_until") is None else float(cast(Any, doc["override_until"])))
                if new != d.settings:
                    d.settings = new
                    self._settings_gen += 1

    async def update_settings(self, name: str, new: Settings, actor: str) -> Settings:
        assert self.ledger is not None
        await self.load_settings()
        d = self.by_name[name]
        old, now = d.settings, time.time()
        audit = [AuditRecord(now, actor, name, k, str(v), str(new.to_doc()[k]))
                 for k, v in old.to_doc().items() if new.to_doc()[k] != v]
        await self.ledger.put_settings(name, new.to_doc(), audit)
        d.settings = new
        self._settings_gen += 1
        for a in audit:
            log.info("budget setting changed", extra={"budget": a.budget, "field": a.field, "old": a.old,
                                                      "new": a.new, "actor": a.actor})
        return new

    # ---- periods and state -----------------------------------------------------------------------

    async def _observe_period(self, d: BudgetDef, period: Period) -> None:
        """Rollover happens once across every process: the store decides who saw the new period first."""
        if self._seen_periods.get(d.name) == period.key or self.ledger is None:
            return
        if await self.ledger.first_seen(d.name, period.key, time.time()):
            meta = f"{d.name}:last_period"
            previous = await self.ledger.get_meta(meta)
            await self.ledger.set_meta(meta, period.key)
            if previous is not None and previous != period.key:
                metrics.budget_events.labels(_ROLLOVER_EVENT[d.period_kind]).inc()
                log.info("budget period rolled over", extra={"budget": d.name, "from_period": previous,
                                                             "to_period": period.key})
        self._seen_periods[d.name] = period.key

    async def state(self, d: BudgetDef) -> BudgetState:
        assert self.ledger is not None
        now = self.clock()
        period = d.period(now)
        await self._observe_period(d, period)
        t = await self.ledger.totals(d.name, period.key)
        self.last_totals[d.name] = t
        view = self.view_of(d, t)
        fc = forecast(t.settled, view.limit_micros, period.start.timestamp(), period.end.timestamp(),
                      now.timestamp())
        return BudgetState(d, period, view, fc)

    async def current_view(self, name: str = GLOBAL_BUDGET) -> BudgetView | None:
        if not self.enabled:
            return None
        d = self.by_name.get(name) or self.defs[0]
        return (await self.state(d)).view

    # ---- the request path ------------------------------------------------------------------------

    def matching(self, facts: RequestFacts) -> list[BudgetDef]:
        return [d for d in self.defs if matches(d.scope, facts)]

    async def admit(self, req_id: str, requested: Target, equivalent: Target | None,
                    facts: RequestFacts | None = None) -> Admission:
        """Reserve first in every matching budget, decide with the totals that saw, redo only on a change."""
        if not self.enabled:
            return Admission(decide(PolicyInput(requested, equivalent, None)), None)
        assert self.ledger is not None
        facts = facts or RequestFacts(requested.model, requested.backend_type)
        now = self.clock()
        ts = now.timestamp()
        plan = self._plans.get(facts)
        if plan is None or plan.gen != self._settings_gen or not plan.valid_from <= ts < plan.valid_until:
            plan = self._plan(facts, now)
        if not plan.defs:
            return Admission(decide(PolicyInput(requested, equivalent, None)), None)
        matched, periods, items = plan.defs, plan.periods, plan.items
        if self.outbox.pending and self.config.store_failure == "closed":
            # Settlements are held only in memory (neither the store nor the disk took them): closed means
            # nothing unrecorded is sent, so refuse until the reconciler has replayed them.
            metrics.store_failures.labels("outbox").inc()
            raise store_unavailable()
        expires = time.time() + self.config.store.reservation_ttl_secs
        try:
            if not plan.observed:
                for d, p in zip(matched, periods, strict=True):
                    await self._observe_period(d, p)
                plan.observed = True
            amount = requested.estimate_micros
            caps = plan.caps if amount > 0 else None
            res = await self.ledger.reserve(req_id, items, amount, expires, caps)
            if res.admitted:
                # Fast path: every budget was Normal before this request (and at the last decision), and the
                # capped reservation fit, so the policy would allow the request as asked in each of them; skip
                # building views and asking it once per budget. The deciding budget is the most utilised one.
                fast, best, i, alert = True, -1, 0, ts >= plan.next_sweep
                self.last_totals.update(zip(plan.names, res.totals, strict=True))
                if not self._not_normal.isdisjoint(plan.names):
                    fast = False
                else:
                    for k, (settled, reserved) in enumerate(res.totals):
                        used = settled + reserved
                        if (used - amount) * 10_000 >= plan.soft[k]:
                            fast = False
                            break
                        if used * 10_000 >= plan.alert_at[k]:
                            alert = True
                        u = (used - amount) * 1_000_000 // plan.limits[k]
                        if u > best:
                            best, i = u, k
                if fast:
                    if alert:
                        plan.next_sweep = ts + 10.0
                        self._check_alerts(matched, periods, res.totals)
                    t = res.totals[i]
                    decision = Decision(Action.ALLOW, requested, "Normal", must_fit=amount > 0 and plan.capped)
                    return Admission(decision, self.view_of(matched[i], Totals(t.settled, t.reserved - amount)),
                                     items, amount, budget=matched[i].name,
                                     reset_in_s=periods[i].seconds_until_reset(now))
            self.last_totals.update(zip(plan.names, res.totals, strict=True))
            befores = [Totals(t.settled, t.reserved - amount) if res.admitted else t for t in res.totals]
            views = [self.view_of(d, t) for d, t in zip(matched, befores, strict=True)]
            refused = [not res.admitted and (cap := self._cap(d, amount)) is not None
                       and t.settled + t.reserved + amount > cap for d, t in zip(matched, res.totals, strict=True)]
            decisions = [decide(PolicyInput(requested, equivalent, v), force_hard=r)
                         for v, r in zip(views, refused, strict=True)]
            i = max(range(len(matched)), key=lambda k: (_ACTION_RANK[decisions[k].action],
                                                        STATUS_CODE[decisions[k].status], views[k].utilization_ppm))
            decision, view, deciding = decisions[i], views[i], matched[i]
            reset = periods[i].seconds_until_reset(now)
            self._note_status(matched, views)
            if res.admitted and decision.action is Action.ALLOW and decision.target == requested:
                self._check_alerts(matched, periods, res.totals)
                return Admission(decision, view, items, amount, budget=deciding.name, reset_in_s=reset)
            if res.admitted:
                await self.ledger.release(req_id)
            if decision.action is Action.REJECT:
                return Admission(decision, view, budget=deciding.name, reset_in_s=reset)
            assert decision.target is not None
            amount = decision.target.estimate_micros
            res = await self.ledger.reserve(req_id, items, amount, expires)
            self._check_alerts(matched, periods, res.totals)
            return Admission(decision, view, items, amount, budget=deciding.name, reset_in_s=reset)
        except StoreUnavailable:
            metrics.store_failures.labels("reserve").inc()
            if self.config.store_failure == "closed":
                raise store_unavailable() from None
            log.warning("budget store unavailable; admitting with store_failure=open")
            return Admission(decide(PolicyInput(requested, equivalent, None)), None, items, outbox=True)

    def _plan(self, facts: RequestFacts, now: datetime) -> _Plan:
        """Built per distinct request facts (bounded): scope matching is pure and facts repeat."""
        matched = self.matching(facts)
        ts = now.timestamp()
        periods = [d.period(now) for d in matched]
        limits = [d.settings.limit_at(ts) for d in matched]
        valid_until = min([p.end.timestamp() for p in periods], default=math.inf)
        for d in matched:  # an override in force lapses by itself: the plan must not outlive it
            until = d.settings.override_until
            if until is not None and ts < until:
                valid_until = min(valid_until, until)
        plan = _Plan(
            matched, tuple(d.name for d in matched), periods,
            tuple((d.name, p.key) for d, p in zip(matched, periods, strict=True)),
            [max(lim, 1) for lim in limits],
            [d.settings.soft_bp * lim for d, lim in zip(matched, limits, strict=True)],
            [(d.thresholds_bp[0] if d.thresholds_bp else 0) * lim for d, lim in zip(matched, limits, strict=True)],
            [None if d.settings.hard_limit_action == "warn" else lim for d, lim in zip(matched, limits, strict=True)],
            any(d.settings.hard_limit_action != "warn" for d in matched),
            max([p.start.timestamp() for p in periods], default=-math.inf), valid_until, self._settings_gen)
        if len(self._plans) >= 4096:
            self._plans.clear()
        self._plans[facts] = plan
        return plan

    def _cap(self, d: BudgetDef, amount: int, ts: float | None = None) -> int | None:
        if d.settings.hard_limit_action == "warn" or amount <= 0:
            return None
        return d.settings.limit_at(self.clock().timestamp() if ts is None else ts)

    def reject_error(self, adm: Admission) -> Exception:
        name = f"budget '{adm.budget}'" if adm.budget and adm.budget != GLOBAL_BUDGET else "monthly budget"
        reason = adm.decision.reason or "budget exhausted"
        reason = reason.replace("monthly budget", name)
        return budget_exceeded(reason, adm.reset_in_s)

    def _note_status(self, matched: list[BudgetDef], views: list[BudgetView]) -> None:
        for d, v in zip(matched, views, strict=True):
            status = v.status()
            if status != self.last_status.get(d.name):
                log.info("budget status changed", extra={"budget": d.name, "from_status": self.last_status.get(
                    d.name), "to_status": status})
                metrics.budget_events.labels(f"status_{status.lower()}").inc()
                self.last_status[d.name] = status
                if status == "Normal":
                    self._not_normal.discard(d.name)
                else:
                    self._not_normal.add(d.name)

    def _check_alerts(self, matched: list[BudgetDef], periods: list[Period], after: list[Totals]) -> None:
        """Cheap in-process check on the request path (integer compares; the forecast at most every 10 s per
        budget); the once-only claim and the webhook run in the background."""
        now = self.clock().timestamp()
        for d, p, t in zip(matched, periods, after, strict=True):
            limit = d.settings.limit_at(now)
            used_bp = (t.settled + t.reserved) * 10_000 // max(limit, 1)
            if used_bp < d.thresholds_bp[0] if d.thresholds_bp else True:
                if now - self._forecast_checked.get(d.name, 0.0) < 10.0:
                    continue
            crossed = False
            for th, th_bp in zip(d.thresholds, d.thresholds_bp, strict=True):
                if used_bp >= th_bp and (d.name, p.key, str(th)) not in self._fired:
                    self._fired.add((d.name, p.key, str(th)))
                    crossed = True
                    asyncio.get_running_loop().create_task(self._claim_and_send(d, p, str(th), t, limit))
            key = (d.name, p.key, "forecast")
            if key in self._fired or (not crossed and now - self._forecast_checked.get(d.name, 0.0) < 10.0):
                continue
            self._forecast_checked[d.name] = now
            if now - p.start.timestamp() >= 86400:
                # Reserved spend counts as committed: the check runs at threshold crossings, when the requests
                # that crossed are often still in flight.
                fc = forecast(t.settled + t.reserved, limit, p.start.timestamp(), p.end.timestamp(), now)
                if fc.exceeds(limit):
                    self._fired.add(key)
                    asyncio.get_running_loop().create_task(self._claim_and_send(d, p, "forecast", t, limit,
                                                                                fc.projected_micros))

    async def _claim_and_send(self, d: BudgetDef, p: Period, threshold: str, t: Totals, limit: int,
                              projected: int | None = None) -> None:
        assert self.ledger is not None
        try:
            if not await self.ledger.first_seen(f"alert:{d.name}:{threshold}", p.key, time.time()):
                return  # another worker or replica sent it
        except StoreUnavailable:
            self._fired.discard((d.name, p.key, threshold))  # try again on a later request
            return
        if projected is None:
            projected = forecast(t.settled, limit, p.start.timestamp(), p.end.timestamp(),
                                 self.clock().timestamp()).projected_micros
        self.alerts.send(alert_payload(d.name, p.key, threshold, t.settled, t.reserved, limit, projected))

    async def settle(self, req_id: str, adm: Admission, cost: int, record: SpendRecord) -> None:
        if self.ledger is None or not adm.items:
            return
        if not adm.outbox:
            try:
                await self.ledger.settle(req_id, adm.items, cost, record)
                return
            except StoreUnavailable:
                metrics.store_failures.labels("settle").inc()
        self.outbox.append({"req_id": req_id, "items": [list(i) for i in adm.items], "cost": cost,
                            "record": {k: getattr(record, k) for k in record.__slots__}})

    async def mark_forwarded(self, req_id: str, note: ForwardNote) -> None:
        """Best effort: without the mark, a reservation whose process dies is released, not charged."""
        if self.ledger is None:
            return
        try:
            await self.ledger.mark_forwarded(req_id, time.time(), note)
        except StoreUnavailable:
            metrics.store_failures.labels("forwarded").inc()

    async def release(self, req_id: str, adm: Admission) -> None:
        if self.ledger is None or not adm.reserved:
            return
        try:
            await self.ledger.release(req_id)
        except StoreUnavailable:
            metrics.store_failures.labels("release").inc()  # the reservation expires by its TTL

    async def reconcile_once(self) -> None:
        """One pass: reap, replay, checkpoint, refresh. Each step stands alone: a failure is logged and
        counted and the next step still runs, so one bad outbox line or a store blip never stops the loop."""
        if self.ledger is None:
            return
        ledger = self.ledger
        await self._step("reap", self._reap)
        await self._step("outbox", lambda: self.outbox.replay(ledger))
        checkpoint = getattr(ledger, "checkpoint", None)
        if checkpoint is not None:
            await self._step("checkpoint", checkpoint)
        for d in self.defs:
            await self._step("state", functools.partial(self.state, d))
        await self._step("meta", lambda: ledger.set_meta(
            "last_reconciliation", self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")))

    async def _reap(self) -> None:
        assert self.ledger is not None
        r = await self.ledger.reap(time.time())
        if r.released:
            metrics.reaped.labels("released").inc(r.released)
            metrics.budget_events.labels("reservations_reaped").inc(r.released)
        if r.charged:
            metrics.reaped.labels("charged").inc(r.charged)
            metrics.reaped_micros.inc(r.charged_micros)
        if r.released or r.charged:
            log.warning("reaped expired reservations: forwarded ones charged at their estimate, the rest "
                        "released", extra={"released": r.released, "charged": r.charged,
                                           "charged_usd": format_usd(r.charged_micros)})

    async def _step(self, name: str, fn: Callable[[], Awaitable[object]]) -> None:
        try:
            await fn()
        except StoreUnavailable:
            metrics.store_failures.labels("reconcile").inc()
        except Exception:
            metrics.reconciler_errors.labels(name).inc()
            log.exception("reconciler step failed; the loop goes on", extra={"step": name})

    async def run_reconciler(self, interval: float, settings_interval: float = 2.0) -> None:
        """Reap, replay and refresh every `interval`; pick up runtime settings every `settings_interval`."""
        last = 0.0
        while True:
            if time.monotonic() - last >= interval:
                await self.reconcile_once()
                last = time.monotonic()
            try:
                await self.load_settings()
            except StoreUnavailable:
                metrics.store_failures.labels("settings").inc()
            except Exception:
                metrics.reconciler_errors.labels("settings").inc()
                log.exception("settings reload failed; the loop goes on")
            await asyncio.sleep(min(interval, settings_interval))
