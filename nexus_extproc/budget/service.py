"""The budget facade the request path uses: admission, settlement and the reconciler. The work is in book.py
(definitions, settings, periods, state), admission.py, alerts.py and reconciler.py; this class wires them to one
ledger and one outbox. The admin edges get `admin` (admin.py), which reads and changes the same book."""

from __future__ import annotations

import time

from nexus_extproc.budget.admin import BudgetAdmin
from nexus_extproc.budget.admission import Admission, Admitter, BudgetStoreDown, Rejection
from nexus_extproc.budget.alert_mail import Mail, MailSender
from nexus_extproc.budget.alerts import AlertSender, AlertWatch
from nexus_extproc.budget.book import GLOBAL_BUDGET, Book, BudgetDef, BudgetState, Clock, Settings, utc_now
from nexus_extproc.budget.policy import Target
from nexus_extproc.budget.reconciler import Reconciler
from nexus_extproc.budget.runaway import Detector
from nexus_extproc.budget.runaway_guard import RunawayGuard
from nexus_extproc.budget.scheduled import ReportScheduler
from nexus_extproc.budget.scopes import RequestFacts
from nexus_extproc.config import NexusConfig
from nexus_extproc.ledger import ForwardNote, Ledger, SpendRecord, StoreUnavailable
from nexus_extproc.ledger.outbox import Outbox
from nexus_extproc.ops import metrics

__all__ = [
    "GLOBAL_BUDGET",
    "Admission",
    "BudgetAdmin",
    "BudgetDef",
    "BudgetService",
    "BudgetState",
    "BudgetStoreDown",
    "Rejection",
    "Settings",
    "utc_now",
]


class BudgetService:
    def __init__(self, config: NexusConfig, ledger: Ledger | None, clock: Clock = utc_now,
                 alerts: AlertSender | None = None, mail: Mail | None = None) -> None:
        self.config = config
        self.budget = config.budget  # the legacy single block, for its options
        self.book = Book(config, ledger, clock)
        self.alerts = alerts or AlertSender(config.alerts)
        self.alerts.on_result = self._alert_result
        if mail is not None and config.alerts.email.smtp_host:
            self.alerts.mail = MailSender(config.alerts, mail, self._alert_emails)
        self.outbox = Outbox(config.store.outbox_path)
        self.always_headers = bool(config.budget and config.budget.always_send_status_headers)
        self.watch = AlertWatch(self.book, self.alerts)
        self.runaway = (RunawayGuard(self.book, self.alerts, Detector(config.runaway))
                        if config.runaway.enabled else None)
        self.admitter = Admitter(config, self.book, self.watch, self.outbox,
                                 self.runaway.detector if self.runaway else None)
        self.admin = BudgetAdmin(self.book)
        self.reports = ReportScheduler(self.book, lambda: self.admin.insights.price_info, self.alerts.post,
                                       mail if config.alerts.email.smtp_host else None)
        self.reconciler = Reconciler(self.book, self.outbox, self.watch, self.reports,
                                     self.runaway.load if self.runaway else None)

    # The book's state, as callers have always read it.
    @property
    def ledger(self) -> Ledger | None:
        return self.book.ledger

    @ledger.setter
    def ledger(self, ledger: Ledger | None) -> None:
        self.book.ledger = ledger

    @property
    def defs(self) -> list[BudgetDef]:
        return self.book.defs

    @property
    def clock(self) -> Clock:
        return self.book.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self.book.clock = clock

    @property
    def enabled(self) -> bool:
        return self.book.enabled

    async def load_settings(self) -> None:
        await self.book.load_settings()

    # ---- the request path ------------------------------------------------------------------------

    async def admit(self, req_id: str, requested: Target, equivalent: Target | None,
                    facts: RequestFacts | None = None, note: ForwardNote | None = None) -> Admission:
        return await self.admitter.admit(req_id, requested, equivalent, facts, note)

    def rejection(self, adm: Admission) -> Rejection:
        return self.admitter.rejection(adm)

    async def settle(self, req_id: str, adm: Admission, cost: int, record: SpendRecord) -> bool:
        """Settle and say whether this call did (False: settled before, or an estimate for a request no longer
        reserved). A store that is down keeps it in the outbox, which counts as done."""
        if self.ledger is None or not adm.items:
            return False
        done, held = True, adm.outbox
        if not held:
            try:
                done = await self.ledger.settle(req_id, adm.items, cost, record)
            except StoreUnavailable:
                metrics.store_failures.labels("settle").inc()
                held = True
        if held:
            self.outbox.append({"req_id": req_id, "items": [list(i) for i in adm.items], "cost": cost,
                                "record": {k: getattr(record, k) for k in record.__slots__}})
        if done and self.runaway is not None:
            self.runaway.settled(adm.facts, cost)
        return done

    async def correct(self, req_id: str, adm: Admission, cost: int, record: SpendRecord) -> bool:
        """A late usage report replacing a settlement made at the estimate. A store that is down keeps it in the
        outbox behind that settlement (the replay corrects only an estimate, once), which counts as done."""
        if self.ledger is None or not adm.items:
            return False
        try:
            return await self.ledger.correct(req_id, adm.items, cost, record)
        except StoreUnavailable:
            metrics.store_failures.labels("correct").inc()
            self.outbox.append({"op": "correct", "req_id": req_id, "items": [list(i) for i in adm.items],
                                "cost": cost, "record": {k: getattr(record, k) for k in record.__slots__}})
            return True

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

    def _alert_emails(self, budget: str) -> list[str]:
        d = self.book.by_name.get(budget)
        return list(d.alert_emails) if d is not None else []

    async def _alert_result(self, alert_id: int, result: str, attempts: int) -> None:
        if self.ledger is None:
            return
        try:
            await self.ledger.alert_delivered(alert_id, result, attempts)
        except StoreUnavailable:
            metrics.store_failures.labels("alert_log").inc()

    # ---- the reconciler ------------------------------------------------------------------------------

    async def reconcile_once(self) -> None:
        await self.reconciler.reconcile_once()

    async def run_reconciler(self, interval: float, settings_interval: float = 2.0) -> None:
        await self.reconciler.run(interval, settings_interval)
