"""Token budgets (issue 28 item 2): `limit_tokens` instead of or beside `limit_usd`, reserved and settled in
tokens in the same atomic reservation as the dollar budgets."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from nexus_extproc.budget.policy import Action, Target
from nexus_extproc.budget.scopes import RequestFacts
from nexus_extproc.config import ConfigError
from nexus_extproc.ledger import SpendRecord
from tests.conftest import make_config
from tests.unit.test_scoped_budgets import Clock, service

T0 = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)


def req(micros: int, tokens: int) -> Target:
    return Target("openai", "cloud", "gpt-4o", micros, tokens)


def test_both_limits_make_two_budgets_and_none_is_refused():
    cfg = make_config(budgets=[{"name": "agents", "limit_usd": 5, "limit_tokens": 100_000}])
    assert [(b.name, b.limit_usd, b.limit_tokens) for b in cfg.budget_defs()] == [
        ("agents", 5, None), ("agents.tokens", None, 100_000)]
    with pytest.raises(ConfigError):
        make_config(budgets=[{"name": "nothing"}])


async def test_a_token_budget_refuses_on_tokens_while_dollars_have_room(tmp_path):
    svc = service(tmp_path, [{"name": "daily-tokens", "period": "daily", "limit_tokens": 10_000,
                              "hard_limit_action": "block_all"},
                             {"name": "money", "limit_usd": 100}], Clock(T0))
    # 6,000 tokens for 100 µ$ fits; settled at the provider's 5,500 (input + output).
    adm = await svc.admit("a", req(100, 6_000), None)
    assert adm.decision.action is Action.ALLOW
    await svc.settle("a", adm, 90, SpendRecord(time.time(), "gpt-4o", "openai", 5_000, 500, 90, "usage"))
    t = await svc.book.current_view("daily-tokens")
    assert (t.settled_micros, t.reserved_micros, t.unit) == (5_500, 0, "tokens")
    assert (await svc.book.current_view("money")).settled_micros == 90
    # 5,000 more tokens would pass 10,000: refused, though it costs 1 µ$ and the dollar budget is nearly empty.
    adm = await svc.admit("b", req(1, 5_000), None)
    assert adm.decision.action is Action.REJECT and adm.budget == "daily-tokens"
    assert adm.view.unit == "tokens" and adm.view.remaining_micros == 4_500
    assert (await svc.book.current_view("money")).reserved_micros == 0  # all or nothing: no dollar hold left
    assert (await svc.admit("c", req(1, 4_000), None)).decision.action is Action.ALLOW


async def test_a_token_budget_reroutes_at_its_soft_limit(tmp_path):
    svc = service(tmp_path, [{"name": "tok", "limit_tokens": 10_000, "soft_limit_percent": 50,
                              "hard_limit_action": "block_cloud"}], Clock(T0))
    eq = Target("ollama", "local", "llama3.1:8b", 0, 2_000)
    adm = await svc.admit("a", req(100, 6_000), eq)
    assert adm.decision.action is Action.ALLOW and adm.decision.target == req(100, 6_000)
    adm = await svc.admit("b", req(100, 2_000), eq)  # 6,000 of 10,000 held: past the soft limit
    assert adm.decision.action is Action.REROUTE and adm.decision.target == eq
    assert adm.reserved == 0  # the local model costs nothing; its tokens are held in the token budget
    assert (await svc.book.current_view("tok")).reserved_micros == 8_000


async def test_a_session_token_budget_counts_each_session(tmp_path):
    svc = service(tmp_path, [{"name": "per-session", "scope": {"session": "*"}, "limit_tokens": 1_000,
                              "hard_limit_action": "block_all"}], Clock(T0))
    a = RequestFacts("gpt-4o", "cloud", session="s-aaaaaaaaaaaaaaaa")
    b = RequestFacts("gpt-4o", "cloud", session="s-bbbbbbbbbbbbbbbb")
    adm = await svc.admit("1", req(10, 900), None, a)
    await svc.settle("1", adm, 10, SpendRecord(time.time(), "gpt-4o", "openai", 800, 100, 10, "usage"))
    assert (await svc.admit("2", req(10, 200), None, a)).decision.action is Action.REJECT
    assert (await svc.admit("3", req(10, 200), None, b)).decision.action is Action.ALLOW
    rows = dict(await svc.ledger.instances("per-session", "T:" + svc.book.period("per-session").key))
    assert rows["per-session/s-aaaaaaaaaaaaaaaa"] == (900, 0) and rows["per-session/s-bbbbbbbbbbbbbbbb"] == (0, 200)
