"""Admission: the policy decision made safe by the ledger, for every budget a request falls under.

`admit` reserves the request's estimate in all its budgets at once (one store round trip; caps where the
budget's action blocks), reads each budget's status from the totals that reservation saw, and lets the
strictest budget decide. Only when the decision changes the target (reroute) or refuses does it release and
redo. A capped reservation that loses the race is refused atomically by the store, all or nothing across the
budgets, and that budget is then treated as at its hard limit. So two requests never both see room for one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from nexus_extproc.budget.alerts import AlertWatch
from nexus_extproc.budget.book import Book, BudgetDef
from nexus_extproc.budget.periods import Period, seconds_until_room
from nexus_extproc.budget.policy import (
    REJECT_EXHAUSTED,
    REJECT_MODEL,
    REJECT_RUNAWAY,
    Action,
    BudgetView,
    Decision,
    PolicyInput,
    Target,
    decide,
    reservation_cap,
    strictest,
)
from nexus_extproc.budget.runaway import Detector
from nexus_extproc.budget.scopes import RequestFacts, model_allowed
from nexus_extproc.config import NexusConfig
from nexus_extproc.ledger import ForwardNote, Key, StoreUnavailable, Totals
from nexus_extproc.ledger.outbox import Outbox
from nexus_extproc.memo import BoundedMemo
from nexus_extproc.ops import metrics

log = logging.getLogger(__name__)

class BudgetStoreDown(Exception):
    """The store cannot be reached and store_failure is closed: nothing may be forwarded unrecorded."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request is refused, as a value: the request layer renders it in the client's API shape."""

    code: str  # policy.REJECT_*
    budget: str | None  # the deciding budget's name
    reset_in_s: int
    short: bool = False  # a short window's refusal (429, a wait a client can sleep through), not a period's (503)
    allowed_models: tuple[str, ...] = ()  # REJECT_MODEL: what the deciding budget allows


@dataclass(slots=True)
class Admission:
    decision: Decision
    view: BudgetView | None  # the deciding budget's view
    items: Sequence[Key] = ()  # (budget, period) reserved against
    reserved: int = 0
    outbox: bool = False  # store was down and store_failure=open: settle into the outbox
    budget: str | None = None  # the budget whose status decided
    reset_in_s: int = 0
    forward_marked: bool = False  # the reservation was written already marked forwarded (one write)
    short: bool = False  # the deciding budget's period is a short window (budget.periods.PeriodRule.short)
    allowed_models: tuple[str, ...] = ()  # refused for its model: the deciding budget's `models`
    facts: RequestFacts | None = None  # what the request was matched by (runaway detection reads it on settle)


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
    caps: list[int | None]  # policy.reservation_cap per budget for a priced request
    valid_from: float
    valid_until: float
    gen: int
    # The first enforced budget whose `models` list does not allow the request's model: it refuses before
    # anything is reserved (no spend, nothing to release).
    disallowed: BudgetDef | None = None
    tokens: tuple[bool, ...] = ()  # per budget: counted in tokens (BudgetDef.unit); empty when none is
    next_sweep: float = 0.0  # next forecast check for these budgets (at most every 10 s)
    observed: bool = False  # these periods' rollover has been recorded in the store


def _decide(d: BudgetDef, view: BudgetView, requested: Target, equivalent: Target | None,
            force_hard: bool = False) -> Decision:
    """The policy for one budget, in its unit: a token budget weighs the request's token estimate. The decision
    names the request's own targets, whichever unit chose them."""
    if d.unit != "tokens":
        return decide(PolicyInput(requested, equivalent, view), force_hard=force_hard)
    rq, eq = requested.in_tokens(), equivalent.in_tokens() if equivalent is not None else None
    dec = decide(PolicyInput(rq, eq, view), force_hard=force_hard)
    target = requested if dec.target is rq else equivalent if eq is not None and dec.target is eq else dec.target
    return Decision(dec.action, target, dec.status, dec.reason)


class Admitter:
    def __init__(self, config: NexusConfig, book: Book, watch: AlertWatch, outbox: Outbox,
                 runaway: Detector | None = None) -> None:
        self.config = config
        self.book = book
        self.watch = watch
        self.outbox = outbox
        self.runaway = runaway
        self._plans: BoundedMemo[RequestFacts, _Plan] = BoundedMemo()

    async def admit(self, req_id: str, requested: Target, equivalent: Target | None,
                    facts: RequestFacts | None = None, note: ForwardNote | None = None) -> Admission:
        """Reserve first in every matching budget, decide with the totals that saw, redo only on a change.

        With `note`, the reservation is written already marked forwarded, for the request as asked: admitted
        that way (nearly every request), the request path needs no second write. A refusal or a reroute releases
        or replaces it as before."""
        if not self.book.enabled:
            return Admission(decide(PolicyInput(requested, equivalent, None)), None)
        assert self.book.ledger is not None
        facts = facts or RequestFacts(requested.model, requested.backend_type)
        now = self.book.clock()
        ts = now.timestamp()
        if self.runaway is not None and self.runaway.penalties:
            hit = self.runaway.penalty(facts, time.time())
            if hit is not None:
                return Admission(Decision(Action.REJECT, None, "HardLimit", REJECT_RUNAWAY), None,
                                 budget=f"runaway:{hit[0]}", reset_in_s=math.ceil(hit[1]),
                                 short=self.runaway.config.action == "throttle")
        adm = await self._admit(req_id, requested, equivalent, facts, note, now, ts)
        adm.facts = facts
        return adm

    async def _admit(self, req_id: str, requested: Target, equivalent: Target | None, facts: RequestFacts,
                     note: ForwardNote | None, now: datetime, ts: float) -> Admission:
        assert self.book.ledger is not None
        plan = self._plans.get(facts)
        if plan is None or plan.gen != self.book.settings_gen or not plan.valid_from <= ts < plan.valid_until:
            try:
                plan = await self._plan(facts, now)
            except StoreUnavailable:
                metrics.store_failures.labels("reserve").inc()
                if self.config.store_failure == "closed":
                    raise BudgetStoreDown() from None
                return Admission(decide(PolicyInput(requested, equivalent, None)), None, outbox=True)
        if not plan.defs:
            return Admission(decide(PolicyInput(requested, equivalent, None)), None)
        if plan.disallowed is not None:
            d = plan.disallowed
            return Admission(Decision(Action.REJECT, None, "Normal", REJECT_MODEL), None, budget=d.name,
                             allowed_models=tuple(d.models or ()))
        matched, periods, items = plan.defs, plan.periods, plan.items
        if self.outbox.pending and self.config.store_failure == "closed":
            # Settlements are held only in memory (neither the store nor the disk took them): closed means
            # nothing unrecorded is sent, so refuse until the reconciler has replayed them.
            metrics.store_failures.labels("outbox").inc()
            raise BudgetStoreDown()
        expires = time.time() + self.config.store.reservation_ttl_secs
        try:
            if not plan.observed:
                for d, p in zip(matched, periods, strict=True):
                    if d.parent is None:  # an instance's rollover is its definition's: one event, not one per team
                        await self.book.observe_period(d, p)
                plan.observed = True
            amount = requested.estimate_micros
            tokens = requested.estimate_tokens if plan.tokens else 0
            # What each budget holds: micro-dollars, or a token budget's tokens.
            amts = [tokens if t else amount for t in plan.tokens] if plan.tokens else [amount] * len(items)
            caps = plan.caps if amount > 0 or tokens > 0 else None
            res = await self.book.ledger.reserve(req_id, items, amount, expires, caps,
                                                 None if note is None else (time.time(), note), tokens=tokens)
            marked = note is not None
            if res.admitted:
                # Fast path: every budget was Normal before this request (and at the last decision), and the
                # capped reservation fit, so the policy allows the request as asked in each of them and the
                # strictest is the most utilised: ask it for that one budget instead of building every view.
                fast, best, i, alert = True, -1, 0, ts >= plan.next_sweep
                self.book.last_totals.update(zip(plan.names, res.totals, strict=True))
                if not self.book.not_normal.isdisjoint(plan.names):
                    fast = False
                else:
                    for k, (settled, reserved) in enumerate(res.totals):
                        used = settled + reserved
                        if (used - amts[k]) * 10_000 >= plan.soft[k]:
                            fast = False
                            break
                        if used * 10_000 >= plan.alert_at[k]:
                            alert = True
                        u = (used - amts[k]) * 1_000_000 // plan.limits[k]
                        if u > best:
                            best, i = u, k
                if fast:
                    if alert:
                        plan.next_sweep = ts + 10.0
                        self.watch.check(matched, periods, res.totals)
                    t = res.totals[i]
                    view = self.book.view_of(matched[i], Totals(t.settled, t.reserved - amts[i]))
                    decision = _decide(matched[i], view, requested, equivalent)
                    if decision.action is Action.ALLOW and decision.target == requested:
                        return Admission(decision, view, items, amount, budget=matched[i].name,
                                         reset_in_s=periods[i].seconds_until_reset(now), forward_marked=marked)
            self.book.last_totals.update(zip(plan.names, res.totals, strict=True))
            befores = [Totals(t.settled, t.reserved - a) if res.admitted else t
                       for t, a in zip(res.totals, amts, strict=True)]
            views = [self.book.view_of(d, t) for d, t in zip(matched, befores, strict=True)]
            refused = [not res.admitted and (cap := reservation_cap(v.hard_limit_action, v.limit_micros, a))
                       is not None and t.settled + t.reserved + a > cap
                       for v, t, a in zip(views, res.totals, amts, strict=True)]
            # An inactive budget is tracked, never enforced: its decision is to allow, at its real status.
            decisions = [_decide(d, v, requested, equivalent, r) if d.settings.active
                         else Decision(Action.ALLOW, requested, v.status())
                         for d, v, r in zip(matched, views, refused, strict=True)]
            i = strictest(decisions, views)
            decision, view, deciding = decisions[i], views[i], matched[i]
            reset = periods[i].seconds_until_reset(now)
            self.book.note_status(matched, views)
            if res.admitted and decision.action is Action.ALLOW and decision.target == requested:
                self.watch.check(matched, periods, res.totals)
                return Admission(decision, view, items, amount, budget=deciding.name, reset_in_s=reset,
                                 forward_marked=marked)
            if res.admitted:
                await self.book.ledger.release(req_id)
            if decision.action is Action.REJECT:
                if deciding.rule.kind == "rolling":
                    reset = await self._until_room(deciding, periods[i], view, amts[i], now)
                return Admission(decision, view, budget=deciding.name, reset_in_s=reset, short=deciding.rule.short)
            assert decision.target is not None
            amount = decision.target.estimate_micros
            res = await self.book.ledger.reserve(req_id, items, amount, expires,
                                                 tokens=decision.target.estimate_tokens if plan.tokens else 0)
            self.watch.check(matched, periods, res.totals)
            return Admission(decision, view, items, amount, budget=deciding.name, reset_in_s=reset)
        except StoreUnavailable:
            metrics.store_failures.labels("reserve").inc()
            if self.config.store_failure == "closed":
                raise BudgetStoreDown() from None
            log.warning("budget store unavailable; admitting with store_failure=open")
            return Admission(decide(PolicyInput(requested, equivalent, None)), None, items, outbox=True)

    async def _plan(self, facts: RequestFacts, now: datetime) -> _Plan:
        """Built per distinct request facts (bounded): scope matching is pure and facts repeat. A distinct-value
        definition contributes the request's instance (claimed in the store on first sight per period)."""
        matched = [await self.book.instance_of(d, facts, now) if d.distinct else d for d in self.book.matching(facts)]
        if len(self.book.last_totals) > 100_000:  # names of instances seen over many periods: a cache, start over
            self.book.last_totals.clear()
            self.book.last_status.clear()
        ts = now.timestamp()
        periods = [d.period(now) for d in matched]
        limits = [d.settings.limit_at(ts) for d in matched]
        valid_until = min([p.end.timestamp() for p in periods], default=math.inf)
        for d in matched:  # an override in force lapses by itself: the plan must not outlive it
            until = d.settings.override_until
            if until is not None and ts < until:
                valid_until = min(valid_until, until)
            if d.parent is not None and d.idle_ttl_s:  # nor an idle-expiring instance's claim (Book.instance_of)
                valid_until = min(valid_until, ts + d.idle_ttl_s / 2)
        plan = _Plan(
            matched, tuple(d.name for d in matched), periods,
            tuple((d.name, d.key(p)) for d, p in zip(matched, periods, strict=True)),
            [max(lim, 1) for lim in limits],
            # An inactive budget never sends the fast path to the full decision.
            [d.settings.soft_bp * lim if d.settings.active else 1 << 62
             for d, lim in zip(matched, limits, strict=True)],
            [(d.thresholds_bp[0] if d.thresholds_bp else 0) * lim for d, lim in zip(matched, limits, strict=True)],
            [reservation_cap(d.settings.hard_limit_action, lim, 1) if d.settings.active else None
             for d, lim in zip(matched, limits, strict=True)],
            max([p.start.timestamp() for p in periods], default=-math.inf), valid_until, self.book.settings_gen,
            next((d for d in matched if d.settings.active and not model_allowed(d.models, facts.model)), None),
            tuple(d.unit == "tokens" for d in matched) if any(d.unit == "tokens" for d in matched) else ())
        return self._plans.put(facts, plan)

    async def _until_room(self, d: BudgetDef, period: Period, view: BudgetView, amount: int, now: datetime) -> int:
        """A rolling window refuses until enough of its spend ages out: read bucket by bucket on a refusal only
        (a full window, per request, would cost every admitted request a range read)."""
        assert self.book.ledger is not None
        need = view.used_micros + max(amount, 1) - view.limit_micros
        try:
            buckets = await self.book.ledger.buckets(d.name, d.key(period))
        except StoreUnavailable:
            return period.seconds_until_reset(now)
        return seconds_until_room(d.rule, period, buckets, need, now)

    @staticmethod
    def rejection(adm: Admission) -> Rejection:
        return Rejection(adm.decision.reason or REJECT_EXHAUSTED, adm.budget, adm.reset_in_s, adm.short,
                         adm.allowed_models)
