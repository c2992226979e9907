"""Budget service with an injected clock: month rollover, admission race, store failure modes."""

import asyncio
import logging
from datetime import UTC, datetime

import pytest

from nexus_extproc.budget.periods import Period, period_for
from nexus_extproc.budget.policy import Action, Target
from nexus_extproc.budget.service import BudgetService, BudgetStoreDown
from nexus_extproc.ledger import SpendRecord, StoreUnavailable, open_ledger
from nexus_extproc.ops import metrics
from tests.conftest import make_config

CLOUD = Target("openai", "cloud", "gpt-4o", 20_000)


def rollovers() -> float:
    return metrics.budget_events.labels("month_rollover")._value.get()


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def month_period(now: datetime) -> Period:
    return period_for("monthly", now)


def test_month_period_is_calendar_month():
    p = month_period(datetime(2026, 2, 15, tzinfo=UTC))
    assert p.key == "2026-02" and p.end == datetime(2026, 3, 1, tzinfo=UTC)
    assert month_period(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)).end == datetime(2027, 1, 1, tzinfo=UTC)
    assert p.seconds_until_reset(datetime(2026, 2, 28, 23, 59, 30, tzinfo=UTC)) == 30


async def test_rollover_starts_at_zero_keeps_history_and_fires_once(tmp_path, caplog):
    cfg = make_config(budget={"monthly_limit_usd": 1}, store={"kind": "sqlite", "path": str(tmp_path / "l.db")})
    clock = Clock(datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC))
    a = BudgetService(cfg, open_ledger("sqlite", path=str(tmp_path / "l.db")), clock)
    b = BudgetService(cfg, open_ledger("sqlite", path=str(tmp_path / "l.db")), clock)  # a second worker
    adm = await a.admit("r1", CLOUD, None)
    await a.settle("r1", adm, 500_000, SpendRecord(0, "gpt-4o", "openai", 1, 1, 20_000, "usage"))
    assert (await a.book.current_view()).settled_micros == 500_000
    await b.book.current_view()
    before = rollovers()
    clock.t = datetime(2026, 12, 1, 0, 0, 0, tzinfo=UTC)
    with caplog.at_level(logging.INFO, logger="nexus_extproc.budget"):
        va = await a.book.current_view()
        vb = await b.book.current_view()
    assert va.settled_micros == 0 and vb.settled_micros == 0
    assert rollovers() == before + 1
    assert sum(r.getMessage() == "Budget month rollover, resetting spending" for r in caplog.records) == 1
    assert (await a.ledger.totals("global", "2026-11")).settled == 500_000  # history kept


async def test_concurrent_admissions_never_overshoot_under_block_all(tmp_path):
    cfg = make_config(budget={"monthly_limit_usd": 1, "hard_limit_action": "block_all"},
                      store={"kind": "sqlite", "path": str(tmp_path / "l.db")})
    services = [BudgetService(cfg, open_ledger("sqlite", path=str(tmp_path / "l.db"), timeout_ms=5000))
                for _ in range(3)]
    tgt = Target("openai", "cloud", "gpt-4o", 1_000_000 // 50)
    results = await asyncio.gather(*(services[i % 3].admit(f"r{i}", tgt, None) for i in range(200)))
    admitted = [r for r in results if r.decision.action is Action.ALLOW]
    assert len(admitted) == 50
    assert all(r.decision.action is Action.REJECT for r in results if r not in admitted)


class DownLedger:
    def __getattr__(self, name):
        async def fail(*a, **k):
            raise StoreUnavailable("down")
        return fail


async def test_store_failure_closed_refuses_as_a_value_the_request_layer_renders():
    """The budget says "store down"; the request layer turns it into the provider-shaped 503 (e2e: faults)."""
    svc = BudgetService(make_config(budget={"monthly_limit_usd": 1}), DownLedger())  # type: ignore[arg-type]
    with pytest.raises(BudgetStoreDown):
        await svc.admit("r", CLOUD, None)


async def test_store_failure_open_admits_and_outbox_replays(tmp_path):
    cfg = make_config(budget={"monthly_limit_usd": 1}, store_failure="open",
                      store={"kind": "sqlite", "path": str(tmp_path / "l.db"),
                             "outbox_path": str(tmp_path / "outbox.jsonl")})
    svc = BudgetService(cfg, DownLedger())  # type: ignore[arg-type]
    adm = await svc.admit("r", CLOUD, None)
    assert adm.decision.action is Action.ALLOW and adm.outbox
    await svc.settle("r", adm, 1234, SpendRecord(0, "gpt-4o", "openai", 1, 1, 20_000, "usage"))
    assert (tmp_path / "outbox.jsonl").exists()
    svc.ledger = open_ledger("sqlite", path=str(tmp_path / "l.db"))
    await svc.reconcile_once()
    assert (await svc.ledger.totals("global", svc.book.period().key)).settled == 1234
    await svc.reconcile_once()  # replay is idempotent: nothing is charged twice
    assert (await svc.ledger.totals("global", svc.book.period().key)).settled == 1234


async def test_three_replicas_on_a_redis_cluster_never_overshoot_five_budgets(redis_cluster_url):
    """Five budgets per request, one of them daily and capped: 3 replicas sharing a 3-master cluster."""
    import uuid

    budgets = [{"name": "global", "limit_usd": 1, "hard_limit_action": "block_all"},
               {"name": "gpt", "scope": {"model": "gpt-*"}, "limit_usd": 100},
               {"name": "cloud", "scope": {"backend_type": "cloud"}, "limit_usd": 100},
               {"name": "daily", "period": "daily", "limit_usd": 100},
               {"name": "weekly", "period": "weekly", "limit_usd": 100}]
    store = {"kind": "redis", "url": redis_cluster_url, "cluster": True, "key_prefix": f"c{uuid.uuid4().hex[:6]}",
             "timeout_ms": 2000}
    cfg = make_config(budgets=budgets, store=store)
    services = [BudgetService(cfg, open_ledger("redis", url=redis_cluster_url, key_prefix=store["key_prefix"],
                                               timeout_ms=2000, cluster=True)) for _ in range(3)]
    tgt = Target("openai", "cloud", "gpt-4o", 1_000_000 // 50)
    results = await asyncio.gather(*(services[i % 3].admit(f"r{i}", tgt, None) for i in range(200)))
    assert sum(r.decision.action is Action.ALLOW for r in results) == 50
    for s in services:
        await s.ledger.close()


async def test_warn_at_the_hard_limit_allows_and_logs_a_warning(tmp_path, caplog):
    cfg = make_config(budget={"monthly_limit_usd": 1, "hard_limit_action": "warn"},
                      store={"kind": "sqlite", "path": str(tmp_path / "l.db")})
    svc = BudgetService(cfg, open_ledger("sqlite", path=str(tmp_path / "l.db")))
    adm = await svc.admit("r1", CLOUD, None)
    await svc.settle("r1", adm, 1_500_000, SpendRecord(0, "gpt-4o", "openai", 1, 1, 20_000, "usage"))
    with caplog.at_level(logging.INFO, logger="nexus_extproc.budget"):
        adm = await svc.admit("r2", CLOUD, None)
    assert adm.decision.action is Action.ALLOW and adm.decision.status == "HardLimit"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage() == "budget status changed"]
    assert [(r.to_status, r.hard_limit_action) for r in warned] == [("HardLimit", "warn")]  # type: ignore[attr-defined]
