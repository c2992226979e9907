"""Issue 28 through the real Envoy, with the SDKs: a rolling budget at its limit answers 429 in the provider's
shape with a Retry-After a client can sleep through (SQLite and Redis); a model outside a budget's allowlist is
refused with 403 before anything is reserved."""

from __future__ import annotations

import time

import anthropic
import openai
import pytest

from tests.e2e.conftest import E2E

MSGS = [{"role": "user", "content": "Hello"}]


# Each gpt-4o request here costs ~$0.00014, each claude-haiku one less: the window holds two or three.
BUDGETS = [{"name": "burst", "period": {"rolling": "1m"}, "limit_usd": 0.0004, "hard_limit_action": "block_all"},
           {"name": "month", "limit_usd": 100}]


def test_rolling_budget_answers_429_with_a_short_retry_after(e2e: E2E, store):
    e2e.restart(budgets=BUDGETS, store=store)
    client = e2e.openai()
    codes: list[int] = []
    refusal: openai.APIStatusError | None = None
    for _ in range(6):
        try:
            client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=10)
            codes.append(200)
        except openai.APIStatusError as e:
            codes.append(e.status_code)
            refusal = e
        time.sleep(0.2)  # the settlement lands before the next request reserves
    assert codes[0] == 200 and codes[-1] == 429 and set(codes) <= {200, 429}, codes
    assert refusal is not None
    err = refusal.response.json()["error"]
    assert err["code"] == "budget_exceeded" and "burst" in err["message"] and err["reset_at"]
    wait = int(refusal.response.headers["retry-after"])
    assert 1 <= wait <= 60  # the 1-minute window's oldest spend ages out within it
    assert refusal.response.headers["x-nexus-budget-reset"] == err["reset_at"]
    # The Anthropic SDK's shape: the same refusal as its RateLimitError.
    with pytest.raises(anthropic.RateLimitError) as caught:
        e2e.anthropic().messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSGS)
    assert caught.value.response.json()["error"]["type"] == "budget_exceeded"
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 60
    burst = {b["name"]: b for b in e2e.stats()["budgets"]}["burst"]
    assert burst["period"] == "rolling 1m" and burst["window"]["seconds"] == 60
    assert 0 < burst["current_spending_usd"] <= 0.0004 + 1e-9


def test_a_model_outside_the_allowlist_gets_403_in_each_providers_shape(e2e: E2E, tmp_path):
    e2e.restart(budgets=[{"name": "month", "limit_usd": 100, "models": ["gpt-4o-mini", "claude-haiku-*"]}],
                store={"kind": "sqlite", "path": str(tmp_path / "allow.db")})
    with pytest.raises(openai.PermissionDeniedError) as oa:
        e2e.openai().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=10)
    err = oa.value.response.json()["error"]
    assert err["code"] == "model_not_allowed" and err["allowed_models"] == ["gpt-4o-mini", "claude-haiku-*"]
    assert oa.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(anthropic.PermissionDeniedError) as an:
        e2e.anthropic().messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=MSGS)
    assert an.value.response.json()["error"]["type"] == "model_not_allowed"
    # The allowed ones pass, and only they were reserved or spent.
    assert e2e.openai().chat.completions.create(model="gpt-4o-mini", messages=MSGS, max_tokens=10).choices
    assert e2e.anthropic().messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MSGS).content
    time.sleep(0.3)
    assert "x-fake-upstream" not in oa.value.response.headers  # answered by the filter, never forwarded
    assert e2e.fake_requests("openai")[-1]["model"] == "gpt-4o-mini"
    spent = e2e.stats()["budgets"][0]
    assert spent["name"] == "month" and spent["current_spending_usd"] > 0 and spent["reserved_usd"] == 0


def test_a_runaway_session_is_throttled_through_envoy(e2e: E2E, tmp_path):
    """Four sessions: three ask once each, one loops. The loop is found against its peers and its next request is
    a 429 runaway_throttled, with a Retry-After within the cap; a calm session still passes."""
    e2e.restart(budgets=[{"name": "month", "limit_usd": 100}],
                store={"kind": "sqlite", "path": str(tmp_path / "runaway.db")},
                runaway={"enabled": True, "by": ["session"], "window": "5m", "baseline": "1h", "factor": 5,
                         "min_spend_usd": "0.0005", "min_peers": 3, "action": "throttle", "cooldown": "1m"})

    def ask(session: str) -> openai.APIStatusError | None:
        try:
            e2e.openai(default_headers={"session-id": session}).chat.completions.create(
                model="gpt-4o", messages=MSGS, max_tokens=10)
            time.sleep(0.15)  # settled before the next one
            return None
        except openai.APIStatusError as e:
            return e

    for i in range(3):
        assert ask(f"calm-{i}") is None
    refused = None
    for _ in range(30):
        refused = ask("loop")
        if refused is not None:
            break
    assert refused is not None, "the loop was never throttled"
    assert refused.status_code == 429
    err = refused.response.json()["error"]
    assert err["code"] == "runaway_throttled" and "session" in err["message"] and "loop" not in err["message"]
    assert 1 <= int(refused.response.headers["retry-after"]) <= 60
    assert ask("calm-0") is None
    assert 'nexus_runaway_findings_total{action="throttle",dimension="session"} 1.0' in e2e.metrics()


def test_a_token_budget_counts_the_providers_tokens_through_envoy(e2e: E2E, store):
    e2e.restart(budgets=[{"name": "month", "limit_usd": 100},
                         {"name": "tok", "limit_tokens": 150, "hard_limit_action": "block_all"}], store=store)
    client = e2e.openai()
    used: list[int] = []
    refusal: openai.APIStatusError | None = None
    for _ in range(20):
        try:
            r = client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=10)
            assert r.usage is not None
            used.append(r.usage.prompt_tokens + r.usage.completion_tokens)
            time.sleep(0.2)  # settled before the next one reserves
        except openai.APIStatusError as e:
            refusal = e
            break
    assert refusal is not None and refusal.status_code == 503 and used, used
    assert "tok" in refusal.response.json()["error"]["message"]
    assert refusal.response.headers["x-nexus-budget-unit"] == "tokens"
    tok = {b["name"]: b for b in e2e.stats()["budgets"]}["tok"]
    # Settled in the provider's own tokens (input + output), to the token.
    assert tok["unit"] == "tokens" and tok["limit_tokens"] == 150 and tok["current_tokens"] == sum(used)
    assert tok["reserved_tokens"] == 0 and tok["current_spending_usd"] is None
    assert 'nexus_budget_spending_tokens{billing_month="' in e2e.metrics()


def test_an_idle_session_leaves_its_budget_slot_after_its_ttl(e2e: E2E, tmp_path):
    """One slot (max_instances 1), a 2 s idle TTL: a second session shares the overflow instance while the first
    is active, and gets the slot of its own once the first has been idle past the TTL."""
    e2e.restart(budgets=[{"name": "per-session", "scope": {"session": "*"}, "limit_usd": 1, "max_instances": 1,
                          "idle_ttl": "2s"}],
                store={"kind": "sqlite", "path": str(tmp_path / "ttl.db")})

    def ask(session: str) -> None:
        e2e.openai(default_headers={"session-id": session}).chat.completions.create(
            model="gpt-4o", messages=MSGS, max_tokens=5)

    def holders() -> tuple[set[str], float]:
        """The instances that have spent, and what the overflow instance has."""
        d = {x["name"]: x for x in e2e.stats()["budgets"]}["per-session"]["distinct"]
        return {t["name"] for t in d["top"] if t["current_spending_usd"] > 0}, d["overflow_spending_usd"]

    ask("first")
    ask("second")
    time.sleep(0.3)
    names, overflow = holders()
    assert len(names) == 1 and overflow > 0  # the second went to the overflow instance
    time.sleep(2.5)  # the first is idle past its TTL
    ask("second")
    time.sleep(0.3)
    now, overflow_after = holders()
    assert len(now - names) == 1 and overflow_after == overflow, (names, now)  # the second has its own now
