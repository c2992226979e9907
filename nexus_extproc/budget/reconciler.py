"""The reconciler loop: reap expired reservations, replay the outbox, checkpoint, refresh state and settings.
Each step stands alone, so one failure never stops the loop."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from nexus_extproc.budget.alerts import AlertWatch
from nexus_extproc.budget.book import Book, BudgetDef
from nexus_extproc.budget.projection import project
from nexus_extproc.budget.scheduled import ReportScheduler
from nexus_extproc.ledger import StoreUnavailable, Totals
from nexus_extproc.ledger.outbox import Outbox
from nexus_extproc.metering.money import format_usd
from nexus_extproc.ops import metrics

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, book: Book, outbox: Outbox, watch: AlertWatch | None = None,
                 reports: ReportScheduler | None = None,
                 shared: Callable[[], Awaitable[None]] | None = None) -> None:
        self.book = book
        self.outbox = outbox
        self.watch = watch
        self.reports = reports
        self.shared = shared  # more state other processes change, read with the settings (runaway penalties)
        self._retained = ""  # the last day this process ran (or saw another run) retention

    async def reconcile_once(self) -> None:
        """One pass: reap, replay, checkpoint, refresh. Each step stands alone: a failure is logged and
        counted and the next step still runs, so one bad outbox line or a store blip never stops the loop."""
        if self.book.ledger is None:
            return
        ledger = self.book.ledger
        await self._step("reap", self._reap)
        await self._step("outbox", lambda: self.outbox.replay(ledger))
        checkpoint = getattr(ledger, "checkpoint", None)
        if checkpoint is not None:
            await self._step("checkpoint", checkpoint)
        for d in self.book.defs:
            await self._step("state", functools.partial(self.book.state, d))
            if self.watch is not None:
                await self._step("forecast", functools.partial(self._forecast, d))
            if d.distinct:
                await self._step("instances", functools.partial(self._instances, d))
        if self.reports is not None:
            await self._step("reports", self.reports.run_due)
        await self._step("retention", self._retention)
        await self._step("meta", lambda: ledger.set_meta(
            "last_reconciliation", self.book.clock().strftime("%Y-%m-%dT%H:%M:%SZ")))

    async def _instances(self, d: BudgetDef) -> None:
        assert self.book.ledger is not None
        rows = await self.book.ledger.instances(d.name, d.key(d.period(self.book.clock())))
        limit = d.settings.limit_at(time.time())
        self.book.instance_summary[d.name] = (len(rows), sum(t.settled for _, t in rows),
                                              sum(t.settled >= limit for _, t in rows))

    async def _forecast(self, d: BudgetDef) -> None:
        """The series forecast's end-of-period point passing the limit fires the forecast alert (once per
        period, across replicas)."""
        assert self.watch is not None
        if d.rule.short or d.unit == "tokens":
            return  # a window of minutes or hours has no end of period to project to; the history is in dollars
        p = await project(self.book, d)
        if p.overrun_likely and p.series.history_days >= 3:
            st = await self.book.state(d)
            self.watch.forecast_overrun(d, st.period, Totals(st.view.settled_micros, st.view.reserved_micros),
                                        p.limit_micros,
                                        p.end_of_period.point_micros)

    async def _retention(self) -> None:
        """Once a day, by whichever process claims the day first."""
        assert self.book.ledger is not None
        cfg = self.book.config.retention
        now = time.time()
        day = self.book.clock().strftime("%Y-%m-%d")
        if day == self._retained or not await self.book.ledger.first_seen("retention", day, now):
            self._retained = day
            return
        self._retained = day
        forever = 1e12
        r = await self.book.ledger.prune(now - cfg.settlements_days * 86400 if cfg.settlements_days else -forever,
                                         now - cfg.alerts_days * 86400 if cfg.alerts_days else -forever, now)
        for kind, n in (("settlements", r.settlements), ("alerts", r.alerts), ("buckets", r.buckets)):
            if n:
                metrics.retention_pruned.labels(kind).inc(n)
        log.info("retention pass", extra={"days_rolled_up": r.days_rolled_up, "settlements": r.settlements,
                                          "alerts": r.alerts, "buckets": r.buckets})

    async def _reap(self) -> None:
        assert self.book.ledger is not None
        r = await self.book.ledger.reap(time.time())
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

    async def run(self, interval: float, settings_interval: float = 2.0) -> None:
        """Reap, replay and refresh every `interval`; pick up runtime settings every `settings_interval`."""
        last = 0.0
        while True:
            if time.monotonic() - last >= interval:
                with metrics.reconciler_duration.labels("BudgetReconciler").time():
                    await self.reconcile_once()
                last = time.monotonic()
            try:
                with metrics.reconciler_duration.labels("SettingsReloader").time():
                    await self.book.load_settings()
                    if self.shared is not None:
                        await self.shared()
            except StoreUnavailable:
                metrics.store_failures.labels("settings").inc()
            except Exception:
                metrics.reconciler_errors.labels("settings").inc()
                log.exception("settings reload failed; the loop goes on")
            await asyncio.sleep(min(interval, settings_interval))
