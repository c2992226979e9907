"""Budgets per distinct value, budgets created and deleted at runtime, and inactive budgets, through the
budget service on a real SQLite ledger shared by two 'replicas'."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from nexus_extproc.budget.alerts import alerts_total
from nexus_extproc.budget.policy import Action, Target
from nexus_extproc.budget.scopes import RequestFacts
from nexus_extproc.budget.service import BudgetService
from nexus_extproc.config import BudgetDefConfig
from nexus_extproc.ledger import SpendRecord, open_ledger
from tests.conftest import make_config

NOW = datetime(2026, 12, 10, tzinfo=UTC)
CLOUD = Target("openai", "cloud", "gpt-4o", 300_000)


def svc(tmp_path, budgets):
    cfg = make_config(budgets=budgets, store={"kind": "sqlite", "path": str(tmp_path / "l.db"),
                                              "outbox_path": str(tmp_path / "o.jsonl")})
    return BudgetService(cfg, open_ledger("sqlite", path=str(tmp_path / "l.db"), timeout_ms=5000), lambda: NOW)


async def spend(s: BudgetService, rid: str, team: str | None, cost: int = 300_000):
    adm = await s.admit(rid, CLOUD, None, RequestFacts("gpt-4o", "cloud", team=team))
    if adm.decision.action is not Action.REJECT:
        await s.settle(rid, adm, cost, SpendRecord(time.time(), "gpt-4o", "openai", 1, 1, cost, "usage"))
    return adm


async def test_one_budget_per_distinct_team_with_its_own_limit_and_an_overflow(tmp_path):
    s = svc(tmp_path, [{"name": "team", "scope": {"team": "*"}, "limit_usd": 1, "hard_limit_action": "block_all",
                        "max_instances": 2, "alert_thresholds": [50]}])
    before = alerts_total.labels("team", "50")._value.get()
    for i in range(3):
        assert (await spend(s, f"a{i}", "alpha")).decision.action is Action.ALLOW  # 0.9 of alpha's $1
    a = await spend(s, "a3", "alpha")
    assert a.decision.action is Action.REJECT and a.budget == "team/alpha"
    b = await spend(s, "b0", "beta")
    assert b.decision.action is Action.ALLOW and b.budget == "team/beta"  # beta has its own dollar
    c = await spend(s, "c0", "gamma")  # a third team past max_instances=2: the shared overflow budget
    assert c.budget == "team/_other"
    d = await spend(s, "d0", "delta")
    assert d.budget == "team/_other"
    none = await s.admit("n0", CLOUD, None, RequestFacts("gpt-4o", "cloud"))  # no team: not this budget's
    assert none.budget is None
    listed = dict(await s.ledger.instances("team", "2026-12"))
    assert set(listed) == {"team/alpha", "team/beta"}
    assert listed["team/alpha"].settled == 900_000
    assert (await s.ledger.totals("team/_other", "2026-12")).settled == 600_000
    # alert per instance, counted under the definition's label only (claimed and sent in background tasks)
    for _ in range(100):
        if alerts_total.labels("team", "50")._value.get() - before >= 2:
            break
        await asyncio.sleep(0.02)
    assert alerts_total.labels("team", "50")._value.get() - before >= 2
    await s.ledger.close()


async def test_instance_names_never_carry_raw_header_text(tmp_path):
    s = svc(tmp_path, [{"name": "team", "scope": {"team": "*"}, "limit_usd": 5}])
    adm = await spend(s, "x", "Team With Spaces/and\ttabs")
    assert adm.budget is not None and adm.budget.startswith("team/h-") and " " not in adm.budget
    await s.ledger.close()


async def test_runtime_budgets_reach_another_replica_and_config_ones_cannot_be_deleted(tmp_path):
    a = svc(tmp_path, [{"name": "global", "limit_usd": 100}])
    b = svc(tmp_path, [{"name": "global", "limit_usd": 100}])
    await a.admin.runtime.create(BudgetDefConfig(name="ml", scope={"team": "ml"}, limit_usd=1,  # type: ignore[arg-type]
                                                 hard_limit_action="block_all"), "alice")
    assert b.book.by_name.get("ml") is None
    await b.load_settings()  # what b's reconciler does every 2 s
    assert b.book.by_name["ml"].origin == "runtime" and b.book.by_name["ml"].created_by == "alice"
    for i in range(3):
        await spend(b, f"m{i}", "ml")
    assert (await spend(b, "m3", "ml")).decision.action is Action.REJECT  # enforced on the other replica
    with pytest.raises(ValueError):
        await a.admin.runtime.create(BudgetDefConfig(name="ml", limit_usd=1), "alice")
    with pytest.raises(ValueError):
        await a.admin.runtime.delete("global", "alice")
    await a.admin.runtime.delete("ml", "bob")
    await b.load_settings()
    assert "ml" not in b.book.by_name
    assert (await spend(b, "m4", "ml")).decision.action is Action.ALLOW  # only global now
    audit = [(r.actor, r.budget, r.field, r.new) for r in await a.admin.audit(10)]
    assert ("alice", "ml", "budget", "created") in audit and ("bob", "ml", "budget", "deleted") in audit
    await a.ledger.close()
    await b.ledger.close()


async def test_a_runtime_budget_keeps_its_definition_through_setlimit_and_reset(tmp_path):
    a = svc(tmp_path, [])
    await a.admin.runtime.create(BudgetDefConfig(name="ml", limit_usd=1), "alice")
    d = a.book.by_name["ml"]
    new = type(d.settings)(5_000_000, d.settings.soft_limit_percent, "block_all")
    await a.admin.update_settings("ml", new, "carol")
    b = svc(tmp_path, [])
    await b.load_settings()
    assert b.book.by_name["ml"].settings.limit_micros == 5_000_000
    await a.admin.reset_settings("ml", "carol")
    await b.load_settings()
    assert b.book.by_name["ml"].settings.limit_micros == 1_000_000  # back to its runtime definition
    await a.ledger.close()
    await b.ledger.close()


async def test_an_inactive_budget_is_tracked_but_never_enforced(tmp_path):
    s = svc(tmp_path, [{"name": "global", "limit_usd": 1, "hard_limit_action": "block_all"}])
    d = s.book.by_name["global"]
    off = type(d.settings)(d.settings.limit_micros, d.settings.soft_limit_percent, "block_all", active=False)
    await s.admin.update_settings("global", off, "alice")
    for i in range(5):  # $1.50 against a $1 limit
        assert (await spend(s, f"r{i}", None)).decision.action is Action.ALLOW
    assert (await s.ledger.totals("global", "2026-12")).settled == 1_500_000  # tracked
    audit = [(r.field, r.old, r.new) for r in await s.admin.audit(5)]
    assert ("active", "True", "False") in audit
    on = type(d.settings)(d.settings.limit_micros, d.settings.soft_limit_percent, "block_all", active=True)
    await s.admin.update_settings("global", on, "alice")
    assert (await spend(s, "r9", None)).decision.action is Action.REJECT
    await s.ledger.close()


async def test_distinct_budgets_have_aggregate_gauges_by_definition_only(tmp_path):
    from nexus_extproc.edge.admin_http import BudgetCollector

    s = svc(tmp_path, [{"name": "team", "scope": {"team": "*"}, "limit_usd": 0.5, "hard_limit_action": "warn"}])
    for i, team in enumerate(["a", "a", "b", "c"]):
        await spend(s, f"r{i}", team)
    await s.reconcile_once()
    samples = {(m.name, tuple(sorted(x.labels.items())), x.value)
               for m in BudgetCollector(s.admin).collect() for x in m.samples if m.name.startswith("nexus_budget_inst")}
    assert ("nexus_budget_instances", (("budget", "team"),), 3) in samples
    assert ("nexus_budget_instances_spending_usd", (("budget", "team"),), 1.2) in samples
    assert ("nexus_budget_instances_at_limit", (("budget", "team"),), 1) in samples  # a: $0.60 of $0.50
    assert all(dict(labels).get("budget") == "team" for _, labels, _ in samples)
    await s.ledger.close()
