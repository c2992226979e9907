"""The seed's metric contract: budget gauges labelled by `billing_month`, one duration per background loop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from nexus_extproc.budget.service import BudgetService
from nexus_extproc.edge.admin_http import BudgetCollector
from nexus_extproc.ledger import open_ledger
from nexus_extproc.ops import metrics
from tests.conftest import make_config


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


def series(collector: BudgetCollector) -> dict[str, set[tuple[str, ...]]]:
    return {fam.name: {tuple(s.labels[k] for k in ("budget", "billing_month")) for s in fam.samples}
            for fam in collector.collect()}


async def test_budget_gauges_carry_the_period_and_drop_the_old_one(tmp_path):
    budgets = [{"name": "global", "limit_usd": 10},
               {"name": "team-ml", "scope": {"team": "ml"}, "period": "daily", "limit_usd": 1}]
    cfg = make_config(budgets=budgets, store={"kind": "sqlite", "path": str(tmp_path / "l.db")})
    clock = Clock(datetime(2026, 11, 30, 23, 0, tzinfo=UTC))
    svc = BudgetService(cfg, open_ledger("sqlite", path=str(tmp_path / "l.db")), clock)
    collector = BudgetCollector(svc.admin)
    for d in svc.admin.defs:
        await svc.admin.state(d)
    before = series(collector)
    assert before["nexus_budget_status"] == {("global", "2026-11"), ("team-ml", "2026-11-30")}
    assert set(before) >= {"nexus_budget_spending_usd", "nexus_budget_limit_usd", "nexus_budget_utilization_percent",
                           "nexus_budget_forecast_usd", "nexus_budget_exhaustion_seconds"}
    clock.t = datetime(2026, 12, 1, 0, 30, tzinfo=UTC)
    after = series(collector)
    assert all(v == {("global", "2026-12"), ("team-ml", "2026-12-01")} for v in after.values()), after


async def test_each_background_loop_reports_its_pass_duration(tmp_path):
    cfg = make_config(budget={"monthly_limit_usd": 1}, store={"kind": "sqlite", "path": str(tmp_path / "l.db")})
    svc = BudgetService(cfg, open_ledger("sqlite", path=str(tmp_path / "l.db")))

    def count(name: str) -> float:
        return next(s.value for f in metrics.reconciler_duration.collect() for s in f.samples
                    if s.name.endswith("_count") and s.labels["reconciler"] == name)

    before = {n: count(n) for n in metrics.RECONCILERS}
    task = asyncio.create_task(svc.run_reconciler(0.05, 0.05))
    await asyncio.sleep(0.3)
    task.cancel()
    assert count("BudgetReconciler") > before["BudgetReconciler"]
    assert count("SettingsReloader") > before["SettingsReloader"]
