"""A deployment's budgets at run time: their definitions, the settings the admin API changed, each budget's
period (and its once-only rollover) and standing. The request path and the admin edges read it through the
service facade; admission, alerts and the reconciler share it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo

from nexus_extproc.budget.forecast import Forecast, forecast
from nexus_extproc.budget.periods import Period, PeriodRule, period_for
from nexus_extproc.budget.policy import BudgetView, HardAction
from nexus_extproc.budget.scopes import RequestFacts, distinct_dims, instance_name, matches, overflow_name
from nexus_extproc.config import BudgetDefConfig, NexusConfig, ReportScheduleConfig, ScopeConfig
from nexus_extproc.ledger import AuditRecord, Ledger, StoreUnavailable, Totals
from nexus_extproc.ledger.base import TOKENS
from nexus_extproc.metering.money import usd_to_micros
from nexus_extproc.ops import metrics
from nexus_extproc.terms import duration_s

log = logging.getLogger(__name__)

GLOBAL_BUDGET = "global"
Clock = Callable[[], datetime]
_ROLLOVER_EVENT = {"daily": "day_rollover", "weekly": "week_rollover", "monthly": "month_rollover"}


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
    active: bool = True  # inactive: tracked, never enforced
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
                "override_until": self.override_until, "active": self.active}


@dataclass(slots=True)
class BudgetDef:
    """One budget at run time: its config plus the settings the admin API may have changed."""

    name: str
    scope: ScopeConfig | None
    rule: PeriodRule
    tz: ZoneInfo
    base: Settings
    thresholds: list[Decimal]
    distinct: tuple[str, ...] = ()  # scope dimensions with "*": one instance per distinct value
    max_instances: int = 10_000
    parent: str | None = None  # set on an instance: the definition it belongs to (its metric label)
    origin: str = "config"  # "config" (the file) or "runtime" (CreateBudget)
    created_by: str | None = None
    created_at: float | None = None
    reports: ReportScheduleConfig | None = None
    models: list[str] | None = None  # the models its requests may ask for (globs); None: any
    idle_ttl_s: int = 0  # a distinct-value instance unused this long leaves the index; 0: never
    alert_emails: list[str] = field(default_factory=list)  # this budget's own alert mail recipients
    # "usd": amounts and limits in micro-dollars; "tokens": in tokens (input + output), the ledger key's TOKENS
    unit: str = "usd"
    settings: Settings = field(init=False)
    # Where the settings come from: None while the config applies, else who set them at runtime and when.
    set_by: str | None = field(init=False, default=None)
    set_at: float | None = field(init=False, default=None)

    thresholds_bp: list[int] = field(init=False)  # thresholds in basis points, for integer compares
    _period: Period | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.settings = self.base
        self.thresholds_bp = [int(t * 100) for t in self.thresholds]

    @classmethod
    def from_config(cls, c: BudgetDefConfig) -> BudgetDef:
        scope = None if c.scope == "global" else cast(ScopeConfig, c.scope)
        ttl = duration_s(c.idle_ttl) if c.idle_ttl else (3600 if scope is not None and scope.session == "*" else 0)
        tokens = c.limit_usd is None  # config.budget_defs() splits a budget with both limits in two
        limit = int(c.limit_tokens or 0) if tokens else usd_to_micros(c.limit_usd or 0)
        return cls(c.name, scope, PeriodRule.of(c.period), ZoneInfo(c.timezone),
                   Settings(limit, c.soft_limit_percent, c.hard_limit_action,
                            active=c.active), list(c.alert_thresholds), distinct_dims(scope), c.max_instances,
                   reports=c.reports, models=c.models, idle_ttl_s=ttl, alert_emails=list(c.alert_emails),
                   unit="tokens" if tokens else "usd")

    @property
    def period_kind(self) -> str:
        """As configured: "monthly", "hourly", "every 10m", "rolling 1h"."""
        return self.rule.text

    @property
    def label(self) -> str:
        """The name metrics may carry: an instance's definition (bounded), never the instance."""
        return self.parent or self.name

    def instance(self, name: str) -> BudgetDef:
        inst = BudgetDef(name, self.scope, self.rule, self.tz, self.base, self.thresholds, (),
                         self.max_instances, self.name, self.origin, models=self.models,
                         idle_ttl_s=self.idle_ttl_s, unit=self.unit)
        inst.settings = self.settings
        return inst

    def key(self, period: Period) -> str:
        """The ledger's period key for this budget: a token budget's carries the TOKENS prefix."""
        return TOKENS + period.key if self.unit == "tokens" else period.key

    def period(self, now: datetime) -> Period:
        """Cached until the period ends: computing calendar boundaries per request is wasted work."""
        p = self._period
        if p is None or not p.start <= now < p.end:
            p = self._period = period_for(self.rule, now, self.tz)
        return p


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A budget's standing right now, for /v1/stats, the admin API and the gauges."""

    defn: BudgetDef
    period: Period
    view: BudgetView
    forecast: Forecast


def differences(d: BudgetDef) -> dict[str, str]:
    """config value -> runtime value, per field that differs."""
    base, cur = d.base.to_doc(), d.settings.to_doc()
    return {k: f"{base[k]} -> {cur[k]}" for k in cur if cur[k] != base[k]}


def definition_doc(d: BudgetDef) -> dict[str, object]:
    """A budget's definition as BudgetDefConfig reads it: how a runtime-created one is stored."""
    scope: object = "global" if d.scope is None else d.scope.model_dump(exclude_none=True)
    return {"name": d.name, "scope": scope, "period": d.rule.config_value(), "timezone": str(d.tz.key),
            **({"limit_tokens": d.base.limit_micros} if d.unit == "tokens"
               else {"limit_usd": str(Decimal(d.base.limit_micros) / 1_000_000)}),
            "soft_limit_percent": str(d.base.soft_limit_percent), "hard_limit_action": d.base.hard_limit_action,
            "alert_thresholds": [str(t) for t in d.thresholds], "max_instances": d.max_instances,
            "active": d.base.active, **({"models": d.models} if d.models else {}),
            **({"idle_ttl": f"{d.idle_ttl_s}s"} if d.idle_ttl_s else {})}


class Book:
    def __init__(self, config: NexusConfig, ledger: Ledger | None, clock: Clock) -> None:
        self.config = config
        self.defs = [BudgetDef.from_config(c) for c in config.budget_defs()]
        self.by_name = {d.name: d for d in self.defs}
        self.config_names = frozenset(self.by_name)
        # Per distinct-value definition: its instances seen by this process (name -> def), and the ones it has
        # claimed in the store, per period key.
        self.instances: dict[str, dict[str, BudgetDef]] = {}
        # Per distinct-value definition, as the reconciler last read the store: (instances, settled sum, how
        # many at or past their limit), for the aggregate gauges.
        self.instance_summary: dict[str, tuple[int, int, int]] = {}
        # (budget, UTC day) -> its complete-day spend history and first weekday, for forecasts (projection.py)
        self.history_cache: dict[tuple[str, str], tuple[list[int], int]] = {}
        self._claimed: dict[tuple[str, str], tuple[BudgetDef, float]] = {}  # -> (instance, claim again at)
        self.ledger = ledger
        self.clock = clock
        self.settings_gen = 0  # bumped on every settings change; plans built before it are rebuilt
        self._seen_periods: dict[str, str] = {}
        self.last_totals: dict[str, Totals] = {d.name: Totals(0, 0) for d in self.defs}
        self.last_status: dict[str, str] = {d.name: "Normal" for d in self.defs}
        self.not_normal: set[str] = set()  # budgets whose last status was not Normal (the fast path's check)

    @property
    def enabled(self) -> bool:
        return bool(self.defs) and self.ledger is not None

    def period(self, name: str = GLOBAL_BUDGET) -> Period:
        d = self.by_name.get(name) or self.defs[0]
        return d.period(self.clock())

    def view_of(self, d: BudgetDef, t: Totals) -> BudgetView:
        s = d.settings
        return BudgetView(s.limit_at(self.clock().timestamp()), t.settled, t.reserved, s.soft_limit_percent,
                          s.hard_limit_action, d.unit)

    async def load_settings(self) -> None:
        """Runtime changes made through the admin API (by any process) win over the config file until
        `reset-limit` drops them. A runtime setting that differs from the config is logged as a warning once
        per change, so a config edit that seems to do nothing explains itself. Budgets created at runtime
        (CreateBudget) appear and disappear here too: every replica within one reload interval."""
        if self.ledger is None:
            return
        docs = await self.ledger.all_settings()
        self._sync_runtime_defs(docs)
        for d in self.defs:
            doc = docs.get(d.name)
            if doc and "limit_micros" in doc:
                new = Settings(
                    int(cast(Any, doc["limit_micros"])), Decimal(str(doc["soft_limit_percent"])),
                    cast(HardAction, doc["hard_limit_action"]),
                    None if doc.get("override_limit_micros") is None else int(cast(Any, doc["override_limit_micros"])),
                    None if doc.get("override_until") is None else float(cast(Any, doc["override_until"])),
                    bool(doc.get("active", True)))
                set_by = str(doc.get("set_by") or "unknown")
                set_at = None if doc.get("set_at") is None else float(cast(Any, doc["set_at"]))
            else:
                new, set_by, set_at = d.base, None, None
            if new != d.settings or set_by != d.set_by:
                self._apply(d, new, set_by, set_at)
                if set_by is not None and new != d.base:
                    log.warning("a runtime setting overrides the config for this budget (nexus-extproc reset-limit "
                                "drops it)", extra={"budget": d.name, "set_by": set_by, **differences(d)})

    def _apply(self, d: BudgetDef, new: Settings, set_by: str | None, set_at: float | None) -> None:
        d.settings, d.set_by, d.set_at = new, set_by, set_at
        for inst in self.instances.get(d.name, {}).values():
            inst.settings = new
        self.settings_gen += 1

    def _sync_runtime_defs(self, docs: dict[str, dict[str, object]]) -> None:
        """Add the budgets created at runtime that this process does not have yet; drop the deleted ones."""
        changed = False
        for name, doc in docs.items():
            spec = doc.get("definition")
            if name in self.config_names or not isinstance(spec, dict) or name in self.by_name:
                continue
            try:
                d = BudgetDef.from_config(BudgetDefConfig.model_validate(spec))
            except ValueError:
                log.error("a runtime budget definition in the store is invalid; skipped", extra={"budget": name})
                continue
            d.origin = "runtime"
            d.created_by = str(doc.get("created_by") or "unknown")
            d.created_at = None if doc.get("created_at") is None else float(cast(Any, doc["created_at"]))
            self.defs.append(d)
            self.by_name[name] = d
            changed = True
        for d in [d for d in self.defs if d.origin == "runtime"]:
            if "definition" not in docs.get(d.name, {}):
                self.defs.remove(d)
                del self.by_name[d.name]
                self.instances.pop(d.name, None)
                changed = True
        if changed:
            self.settings_gen += 1

    def _definition_part(self, name: str) -> dict[str, object]:
        """What a runtime-created budget's settings document must keep whatever else changes."""
        d = self.by_name.get(name)
        if d is None or d.origin != "runtime":
            return {}
        return {"definition": definition_doc(d), "created_by": d.created_by, "created_at": d.created_at}

    async def instance_of(self, d: BudgetDef, facts: RequestFacts, now: datetime) -> BudgetDef:
        """The request's instance of a distinct-value definition, claimed in the store once per period and
        process. Past `max_instances` the overflow instance takes it; with the store down, the instance is
        used unclaimed (the bound is then best effort until the next period)."""
        name = instance_name(d.name, d.distinct, facts)
        period = d.key(d.period(now))
        ts = now.timestamp()
        hit = self._claimed.get((name, period))
        if hit is not None and ts < hit[1]:
            return hit[0]
        ok = True
        if self.ledger is not None:
            try:
                ok = await self.ledger.claim_instance(d.name, period, name, d.max_instances, d.idle_ttl_s)
            except StoreUnavailable:
                ok = True
        if not ok:
            name = overflow_name(d.name)
        known = self.instances.setdefault(d.name, {})
        inst = known.get(name)
        if inst is None:
            if len(known) > 2 * d.max_instances:
                known.clear()
            inst = known[name] = d.instance(name)
        if len(self._claimed) > 100_000:
            self._claimed.clear()
        # An idle-expiring instance is claimed again every half TTL while in use: the claim is what keeps it
        # in the store's index.
        again = ts + d.idle_ttl_s / 2 if d.idle_ttl_s else math.inf
        self._claimed[(name if ok else instance_name(d.name, d.distinct, facts), period)] = (inst, again)
        return inst

    async def reset_settings(self, name: str, actor: str) -> Settings:
        """Drop the runtime setting: the config file applies again, on every replica at its next reload."""
        assert self.ledger is not None
        await self.load_settings()
        d = self.by_name[name]
        now = time.time()
        audit = [AuditRecord(now, actor, name, k, str(v), str(d.base.to_doc()[k]))
                 for k, v in d.settings.to_doc().items() if d.base.to_doc()[k] != v]
        audit.append(AuditRecord(now, actor, name, "source", "runtime" if d.set_by else "config", "config"))
        await self.ledger.put_settings(name, self._definition_part(name) or None, audit)
        self._apply(d, d.base, None, None)
        log.info("budget setting reset to the config", extra={"budget": name, "actor": actor})
        return d.settings

    async def update_settings(self, name: str, new: Settings, actor: str) -> Settings:
        assert self.ledger is not None
        await self.load_settings()
        d = self.by_name[name]
        old, now = d.settings, time.time()
        audit = [AuditRecord(now, actor, name, k, str(v), str(new.to_doc()[k]))
                 for k, v in old.to_doc().items() if new.to_doc()[k] != v]
        await self.ledger.put_settings(name, {**self._definition_part(name), **new.to_doc(), "set_by": actor,
                                              "set_at": now}, audit)
        self._apply(d, new, actor, now)
        for a in audit:
            log.info("budget setting changed", extra={"budget": a.budget, "field": a.field, "old": a.old,
                                                      "new": a.new, "actor": a.actor})
        return new

    async def observe_period(self, d: BudgetDef, period: Period) -> None:
        """Rollover happens once across every process: the store decides who saw the new period first."""
        if self._seen_periods.get(d.name) == period.key or self.ledger is None or d.rule.short:
            return  # a short window has no rollover to announce: it would be an event every few minutes
        if await self.ledger.first_seen(d.name, period.key, time.time()):
            meta = f"{d.name}:last_period"
            previous = await self.ledger.get_meta(meta)
            await self.ledger.set_meta(meta, period.key)
            if previous is not None and previous != period.key:
                metrics.budget_events.labels(_ROLLOVER_EVENT[d.period_kind]).inc()
                # The seed's words ("Budget month rollover, resetting spending"), which operators grep for.
                unit = {"monthly": "month", "weekly": "week", "daily": "day"}.get(d.period_kind, d.period_kind)
                log.info(f"Budget {unit} rollover, resetting spending",
                         extra={"budget": d.name, "from_period": previous, "to_period": period.key})
        self._seen_periods[d.name] = period.key

    async def state(self, d: BudgetDef) -> BudgetState:
        assert self.ledger is not None
        now = self.clock()
        period = d.period(now)
        await self.observe_period(d, period)
        t = await self.ledger.totals(d.name, d.key(period))
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

    def matching(self, facts: RequestFacts) -> list[BudgetDef]:
        return [d for d in self.defs if matches(d.scope, facts)]

    def note_status(self, matched: list[BudgetDef], views: list[BudgetView]) -> None:
        for d, v in zip(matched, views, strict=True):
            status = v.status()
            if status != self.last_status.get(d.name):
                # Reaching the hard limit under `warn` lets every request through: that is worth a warning.
                level = logging.WARNING if status == "HardLimit" else logging.INFO
                log.log(level, "budget status changed", extra={
                    "budget": d.name, "from_status": self.last_status.get(d.name), "to_status": status,
                    "hard_limit_action": d.settings.hard_limit_action})
                metrics.budget_events.labels(f"status_{status.lower()}").inc()
                self.last_status[d.name] = status
                if status == "Normal":
                    self.not_normal.discard(d.name)
                else:
                    self.not_normal.add(d.name)
