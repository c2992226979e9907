"""Session and tool scopes with an idle TTL, and model allowlists (issue 28 items 3 and 4)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from nexus_extproc.apis.errors import model_not_allowed
from nexus_extproc.budget.policy import REJECT_MODEL, Action, Target
from nexus_extproc.budget.scopes import RequestFacts, matches
from nexus_extproc.config import ScopeConfig
from nexus_extproc.ledger import SpendRecord, open_ledger
from tests.unit.test_scoped_budgets import Clock, service

T0 = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
REC = SpendRecord(time.time(), "claude-sonnet-4-5", "anthropic", 1, 1, 0, "usage")


@pytest.mark.parametrize(("scope", "facts", "want"), [
    (ScopeConfig(tool="claude-code"), RequestFacts("m", "cloud", tool="claude-code"), True),
    (ScopeConfig(tool="claude-code"), RequestFacts("m", "cloud", tool="codex"), False),
    (ScopeConfig(session="*"), RequestFacts("m", "cloud", session="s-0123456789abcdef"), True),
    (ScopeConfig(session="*"), RequestFacts("m", "cloud"), False),  # no session id: not a session's request
    (ScopeConfig(team="ml", tool="*"), RequestFacts("m", "cloud", team="ml", tool="codex"), True),
    (ScopeConfig(team="ml", tool="*"), RequestFacts("m", "cloud", team="web", tool="codex"), False),
])
def test_tool_and_session_scopes_match(scope, facts, want):
    assert matches(scope, facts) is want


async def test_two_dollars_per_claude_code_session_per_team(tmp_path):
    """One budget instance per (team, session) of Claude Code: one session at its cap leaves the next free."""
    svc = service(tmp_path, [{"name": "cc-session", "scope": {"team": "*", "tool": "claude-code", "session": "*"},
                              "limit_usd": 2, "hard_limit_action": "block_all"}], Clock(T0))
    a = RequestFacts("claude-sonnet-4-5", "cloud", team="ml", tool="claude-code", session="s-aaaaaaaaaaaaaaaa")
    b = RequestFacts("claude-sonnet-4-5", "cloud", team="ml", tool="claude-code", session="s-bbbbbbbbbbbbbbbb")
    adm = await svc.admit("1", Target("anthropic", "cloud", "claude-sonnet-4-5", 1_900_000), None, a)
    assert adm.decision.action is Action.ALLOW and adm.budget == "cc-session/ml+s-aaaaaaaaaaaaaaaa"
    await svc.settle("1", adm, 1_900_000, REC)
    refused = await svc.admit("2", Target("anthropic", "cloud", "claude-sonnet-4-5", 200_000), None, a)
    assert refused.decision.action is Action.REJECT and refused.budget == "cc-session/ml+s-aaaaaaaaaaaaaaaa"
    other = await svc.admit("3", Target("anthropic", "cloud", "claude-sonnet-4-5", 200_000), None, b)
    assert other.decision.action is Action.ALLOW and other.budget == "cc-session/ml+s-bbbbbbbbbbbbbbbb"
    # Codex's requests are not counted by it at all.
    codex = RequestFacts("gpt-5.1", "cloud", team="ml", tool="codex", session="s-aaaaaaaaaaaaaaaa")
    assert (await svc.admit("4", Target("openai", "cloud", "gpt-5.1", 5_000_000), None, codex)).items == ()


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return open_ledger("sqlite", path=str(tmp_path / "ttl.db"), timeout_ms=5000)
    return open_ledger("redis", url=request.getfixturevalue("redis_url"), key_prefix=f"t{uuid.uuid4().hex[:6]}")


async def test_idle_instances_leave_the_bound_after_their_ttl(store):
    assert await store.claim_instance("s", "2026-11", "s/a", 2, idle_ttl_s=1)
    assert await store.claim_instance("s", "2026-11", "s/b", 2, idle_ttl_s=1)
    assert not await store.claim_instance("s", "2026-11", "s/c", 2, idle_ttl_s=1)  # the bound holds
    await asyncio.sleep(1.1)
    assert await store.claim_instance("s", "2026-11", "s/a", 2, idle_ttl_s=1)  # a returning one is kept
    await asyncio.sleep(1.1)
    assert await store.claim_instance("s", "2026-11", "s/b", 2, idle_ttl_s=1)  # a is idle past its TTL: b again
    assert await store.claim_instance("s", "2026-11", "s/c", 2, idle_ttl_s=1)  # ... so c takes a's place
    assert [n for n, _ in await store.instances("s", "2026-11")] == ["s/b", "s/c"]
    # Without a TTL nothing expires.
    assert await store.claim_instance("t", "2026-11", "t/a", 1)
    await asyncio.sleep(1.1)
    assert not await store.claim_instance("t", "2026-11", "t/b", 1)
    await store.close()


async def test_session_instances_are_claimed_again_while_in_use(tmp_path):
    """The process re-claims an instance each half TTL, which keeps an active session in the store's index."""
    clock = Clock(T0)
    svc = service(tmp_path, [{"name": "sess", "scope": {"session": "*"}, "limit_usd": 1, "max_instances": 1,
                              "idle_ttl": "10m"}], clock)
    claims: list[str] = []
    real = svc.ledger.claim_instance

    async def counting(parent, period, name, max_instances, idle_ttl_s=0):
        claims.append(name)
        assert idle_ttl_s == 600
        return await real(parent, period, name, max_instances, idle_ttl_s)

    svc.ledger.claim_instance = counting  # type: ignore[method-assign]
    a = RequestFacts("gpt-4o", "cloud", session="s-aaaaaaaaaaaaaaaa")
    for minutes in (0, 1, 4, 6):
        clock.t = T0 + timedelta(minutes=minutes)
        await svc.admit(f"r{minutes}", Target("openai", "cloud", "gpt-4o", 10), None, a)
    assert claims == ["sess/s-aaaaaaaaaaaaaaaa"] * 2  # at 0 and again after 5 minutes (half of 10)


async def test_a_model_outside_the_allowlist_is_refused_before_anything_is_reserved(tmp_path):
    svc = service(tmp_path, [{"name": "global", "limit_usd": 100},
                             {"name": "interns", "scope": {"team": "interns"}, "limit_usd": 5,
                              "models": ["gpt-4o-mini", "claude-haiku-*"]}], Clock(T0))
    intern = RequestFacts("gpt-4o", "cloud", team="interns")
    adm = await svc.admit("1", Target("openai", "cloud", "gpt-4o", 100), None, intern)
    assert adm.decision.action is Action.REJECT and adm.decision.reason == REJECT_MODEL
    assert adm.budget == "interns" and adm.allowed_models == ("gpt-4o-mini", "claude-haiku-*")
    assert (await svc.ledger.totals("global", svc.book.period().key)) == (0, 0)
    ok = RequestFacts("claude-haiku-4-5", "cloud", team="interns")
    assert (await svc.admit("2", Target("anthropic", "cloud", "claude-haiku-4-5", 100), None, ok)
            ).decision.action is Action.ALLOW
    other_team = RequestFacts("gpt-4o", "cloud", team="ml")
    assert (await svc.admit("3", Target("openai", "cloud", "gpt-4o", 100), None, other_team)
            ).decision.action is Action.ALLOW
    err = model_not_allowed("interns", "gpt-4o", adm.allowed_models)
    assert err.status == 403 and err.headers["x-should-retry"] == "false"
    assert err.extra["allowed_models"] == ["gpt-4o-mini", "claude-haiku-*"]


async def test_an_inactive_budget_does_not_enforce_its_allowlist(tmp_path):
    svc = service(tmp_path, [{"name": "trial", "limit_usd": 5, "models": ["gpt-4o-mini"], "active": False}],
                  Clock(T0))
    adm = await svc.admit("1", Target("openai", "cloud", "gpt-4o", 100), None, RequestFacts("gpt-4o", "cloud"))
    assert adm.decision.action is Action.ALLOW
