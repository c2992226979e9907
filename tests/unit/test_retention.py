"""The daily retention pass (issue 28 item 6): once a day across processes, by the configured ages."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from nexus_extproc.ledger import SpendRecord
from nexus_extproc.ops import metrics
from tests.unit.test_scoped_budgets import Clock, service


async def test_retention_runs_once_a_day_across_processes(tmp_path):
    clock = Clock(datetime.fromtimestamp(time.time(), UTC))
    budgets = [{"name": "global", "limit_usd": 100}]
    a = service(tmp_path, budgets, clock, retention={"alerts_days": 30, "settlements_days": 400})
    b = service(tmp_path, budgets, clock, retention={"alerts_days": 30, "settlements_days": 400})
    now = time.time()
    keys = [("global", "2025-01")]
    for i, ts in enumerate((now - 450 * 86400, now - 10 * 86400)):
        await a.ledger.reserve(f"r{i}", keys, 5, now + 60)
        await a.ledger.settle(f"r{i}", keys, 5, SpendRecord(ts, "gpt-4o", "openai", 1, 1, 5, "usage"))
    await a.ledger.record_alert(now - 40 * 86400, "global", "2025-01", "80", 1, 2)
    pruned = metrics.retention_pruned.labels("settlements")._value.get()
    await a.reconcile_once()
    await b.reconcile_once()
    await a.reconcile_once()
    assert metrics.retention_pruned.labels("settlements")._value.get() - pruned == 1  # one pass, one old row
    assert await a.ledger.list_alerts(10) == []
    spend = await a.ledger.spend(now - 500 * 86400, now + 1, False)
    assert sorted(x.cost for x in spend) == [5, 5]  # the old day still reports, from its roll-up
