"""Budget service: the policy decision made safe by the ledger, plus the periodic chores.

`admit` reads the period's totals, asks the pure policy, and reserves the chosen target's estimate, with a
cap when the decision depends on room being left. If another request took that room in between, the capped
reservation is refused atomically by the store and the policy is asked again as at the hard limit. So two
requests never both see room for one, on one worker or many.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

from nexus_extproc import metrics
from nexus_extproc.config import NexusConfig
from nexus_extproc.errors import budget_exceeded, store_unavailable
from nexus_extproc.ledger import AuditRecord, Ledger, ReserveItem, SpendRecord, StoreUnavailable, Totals
from nexus_extproc.money import usd_to_micros
from nexus_extproc.periods import Period, month_period
from nexus_extproc.policy import Action, BudgetView, Decision, HardAction, PolicyInput, Target, decide

log = logging.getLogger("nexus_extproc.budget")

GLOBAL_BUDGET = "global"
Clock = Callable[[], datetime]


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

    def limit_at(self, now: float) -> int:
        if self.override_limit_micros is not None and self.override_until is not None and now < self.override_until:
            return self.override_limit_micros
        return self.limit_micros

    def to_doc(self) -> dict[str, object]:
        return {"limit_micros": self.limit_micros, "soft_limit_percent": str(self.soft_limit_percent),
                "hard_limit_action": self.hard_limit_action, "override_limit_micros": self.override_limit_micros,
                "override_until": self.override_until}


@dataclass(slots=True)
class Admission:
    decision: Decision
    view: BudgetView | None
    items: list[tuple[str, str]] = field(default_factory=list)  # (budget, period) reserved against
    reserved: int = 0
    outbox: bool = False  # store was down and store_failure=open: settle into the outbox


class Outbox:
    """Settlements that could not reach the store (store_failure=open), fsynced to a local file and
    replayed in order when the store is back: settled spend is never dropped."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def append(self, entry: dict[str, object]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())

    async def replay(self, ledger: Ledger) -> int:
        if not self.path.exists():
            return 0
        claimed = self.path.with_suffix(f".replay-{os.getpid()}")
        try:
            os.replace(self.path, claimed)  # atomic claim: one process replays a given batch
        except FileNotFoundError:
            return 0
        lines = claimed.read_text(encoding="utf-8").splitlines()
        done = 0
        try:
            for line in lines:
                e = json.loads(line)
                rec = SpendRecord(**e["record"])
                await ledger.settle(e["req_id"], [tuple(i) for i in e["items"]], int(e["cost"]), rec)
                done += 1
        except StoreUnavailable:
            with self.path.open("a", encoding="utf-8") as f:  # put the rest back
                for line in lines[done:]:
                    f.write(line + "\n")
        claimed.unlink(missing_ok=True)
        return done


class BudgetService:
    def __init__(self, config: NexusConfig, ledger: Ledger | None, clock: Clock = utc_now) -> None:
        self.config = config
        self.budget = config.budget
        self.ledger = ledger
        self.clock = clock
        self.outbox = Outbox(config.store.outbox_path)
        b = self.budget
        self.base = Settings(usd_to_micros(b.monthly_limit_usd) if b else 0,
                             b.soft_limit_percent if b else Decimal(80), b.hard_limit_action if b else "warn")
        self.settings = self.base
        self._period_key: str | None = None
        self.last_totals = Totals(0, 0)
        self.last_status = "Normal"

    @property
    def enabled(self) -> bool:
        return self.budget is not None and self.ledger is not None

    def period(self) -> Period:
        return month_period(self.clock())

    @property
    def _limit(self) -> int:
        return self.settings.limit_at(self.clock().timestamp())

    def view_of(self, t: Totals) -> BudgetView:
        s = self.settings
        return BudgetView(self._limit, t.settled, t.reserved, s.soft_limit_percent, s.hard_limit_action)

    async def load_settings(self) -> Settings:
        """Runtime changes made through the admin API (by any process) win over the config file."""
        if self.ledger is None or self.budget is None:
            return self.settings
        doc = await self.ledger.get_settings(GLOBAL_BUDGET)
        if doc:
            self.settings = Settings(
                int(cast(Any, doc["limit_micros"])), Decimal(str(doc["soft_limit_percent"])),
                cast(HardAction, doc["hard_limit_action"]),
                None if doc.get("override_limit_micros") is None else int(cast(Any, doc["override_limit_micros"])),
                None if doc.get("override_until") is None else float(cast(Any, doc["override_until"])))
        return self.settings

    async def update_settings(self, new: Settings, actor: str) -> Settings:
        assert self.ledger is not None
        old = await self.load_settings()
        now = time.time()
        audit = [AuditRecord(now, actor, GLOBAL_BUDGET, k, str(v), str(new.to_doc()[k]))
                 for k, v in old.to_doc().items() if new.to_doc()[k] != v]
        await self.ledger.put_settings(GLOBAL_BUDGET, new.to_doc(), audit)
        self.settings = new
        for a in audit:
            log.info("budget setting changed", extra={"budget": a.budget, "field": a.field, "old": a.old,
                                                      "new": a.new, "actor": a.actor})
        return new

    async def _observe_period(self, period: Period) -> None:
        """Rollover happens once across every process: the store decides who saw the new period first."""
        if period.key == self._period_key or self.ledger is None:
            return
        if await self.ledger.first_seen(GLOBAL_BUDGET, period.key, time.time()):
            previous = await self.ledger.get_meta("global:last_period")
            await self.ledger.set_meta("global:last_period", period.key)
            if previous is not None and previous != period.key:
                metrics.budget_events.labels("month_rollover").inc()
                log.info("budget period rolled over", extra={"from_period": previous, "to_period": period.key})
        self._period_key = period.key

    async def current_view(self) -> BudgetView | None:
        if not self.enabled:
            return None
        assert self.ledger is not None
        period = self.period()
        await self._observe_period(period)
        self.last_totals = await self.ledger.totals(GLOBAL_BUDGET, period.key)
        return self.view_of(self.last_totals)

    async def admit(self, req_id: str, requested: Target, equivalent: Target | None) -> Admission:
        """Reserve first, decide with the totals the reservation saw, and redo only when the policy picks
        another target: the common case costs one store round trip."""
        if not self.enabled:
            return Admission(decide(PolicyInput(requested, equivalent, None)), None)
        assert self.ledger is not None and self.budget is not None
        period = self.period()
        items = [(GLOBAL_BUDGET, period.key)]
        expires = time.time() + self.config.store.reservation_ttl_secs
        blocking = self.settings.hard_limit_action != "warn"
        try:
            await self._observe_period(period)
            amount = requested.estimate_micros
            cap = self._limit if blocking and amount > 0 else None
            res = await self.ledger.reserve(req_id, [ReserveItem(GLOBAL_BUDGET, period.key, amount, cap)], expires)
            t = res.totals[0]
            before = Totals(t.settled, t.reserved - amount) if res.admitted else t
            self.last_totals = t
            view = self.view_of(before)
            decision = decide(PolicyInput(requested, equivalent, view), force_hard=not res.admitted)
            if res.admitted and decision.action is Action.ALLOW and decision.target == requested:
                self._note_status(decision.status)
                return Admission(decision, view, items, amount)
            if res.admitted:
                await self.ledger.release(req_id)
            self._note_status(decision.status)
            if decision.action is Action.REJECT:
                return Admission(decision, view)
            assert decision.target is not None
            amount = decision.target.estimate_micros
            res = await self.ledger.reserve(req_id, [ReserveItem(GLOBAL_BUDGET, period.key, amount)], expires)
            self.last_totals = res.totals[0]
            return Admission(decision, view, items, amount)
        except StoreUnavailable:
            metrics.store_failures.labels("reserve").inc()
            if self.config.store_failure == "closed":
                raise store_unavailable() from None
            log.warning("budget store unavailable; admitting with store_failure=open")
            return Admission(decide(PolicyInput(requested, equivalent, None)), None, items, outbox=True)

    def reject_error(self, decision: Decision) -> Exception:
        return budget_exceeded(decision.reason or "budget exhausted",
                               self.period().seconds_until_reset(self.clock()))

    def _note_status(self, status: str) -> None:
        if status != self.last_status:
            log.info("budget status changed", extra={"from_status": self.last_status, "to_status": status})
            metrics.budget_events.labels(f"status_{status.lower()}").inc()
            self.last_status = status

    async def settle(self, req_id: str, adm: Admission, cost: int, record: SpendRecord) -> None:
        if self.ledger is None or not adm.items:
            return
        if not adm.outbox:
            try:
                await self.ledger.settle(req_id, adm.items, cost, record)
                return
            except StoreUnavailable:
                metrics.store_failures.labels("settle").inc()
        self.outbox.append({"req_id": req_id, "items": adm.items, "cost": cost,
                            "record": {k: getattr(record, k) for k in record.__slots__}})

    async def release(self, req_id: str, adm: Admission) -> None:
        if self.ledger is None or not adm.reserved:
            return
        try:
            await self.ledger.release(req_id)
        except StoreUnavailable:
            metrics.store_failures.labels("release").inc()  # the reservation expires by its TTL

    async def reconcile_once(self) -> None:
        if self.ledger is None:
            return
        try:
            reaped = await self.ledger.reap(time.time())
            if reaped:
                metrics.budget_events.labels("reservations_reaped").inc(reaped)
                log.warning("reaped expired reservations", extra={"count": reaped})
            await self.outbox.replay(self.ledger)
            if self.enabled:
                await self.current_view()
            await self.ledger.set_meta("last_reconciliation",
                                       self.clock().strftime("%Y-%m-%dT%H:%M:%SZ"))
        except StoreUnavailable:
            metrics.store_failures.labels("reconcile").inc()

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
            await asyncio.sleep(min(interval, settings_interval))
