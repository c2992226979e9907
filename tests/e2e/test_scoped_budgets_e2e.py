"""Issue 8 through the real Envoy with the SDKs: team and agent budgets, on SQLite and Redis."""

from __future__ import annotations

import re
import time
import uuid

import openai

from tests.e2e.conftest import E2E

MSGS = [{"role": "user", "content": "Hello"}]


BUDGETS = [
    {"name": "global", "limit_usd": 100},
    # Each gpt-4o request here costs ~$0.00014: the team budget holds about two of them.
    {"name": "team-ml", "scope": {"team": "ml"}, "limit_usd": 0.0003, "hard_limit_action": "block_all"},
    {"name": "agent-bot", "scope": {"agent": "bot"}, "period": "daily", "limit_usd": 0.0001,
     "hard_limit_action": "block_cloud"},
]


def budgets_by_name(e2e: E2E) -> dict[str, dict]:
    return {b["name"]: b for b in e2e.stats()["budgets"]}


def test_team_budget_blocks_its_team_only(e2e: E2E, store):
    e2e.restart(budgets=BUDGETS, store=store, identity={"trust_identity_headers": True})
    ml = e2e.openai(default_headers={"x-nexus-team": "ml"})
    codes = []
    for _ in range(4):
        try:
            ml.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=10)
            codes.append(200)
        except openai.APIStatusError as e:
            codes.append(e.status_code)
            assert e.response.json()["error"]["code"] == "budget_exceeded"
            assert "team-ml" in e.response.json()["error"]["message"]
    assert 200 in codes and codes[-1] == 503
    web = e2e.openai(default_headers={"x-nexus-team": "web"})
    assert web.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=10).choices  # other team: fine
    time.sleep(0.3)
    b = budgets_by_name(e2e)
    assert b["team-ml"]["current_spending_usd"] <= 0.0003 + 1e-9
    assert b["global"]["current_spending_usd"] > b["team-ml"]["current_spending_usd"]  # web's spend too
    assert b["team-ml"]["scope"] == {"team": "ml"} and b["agent-bot"]["period"] == "daily"


def test_agent_budget_reroutes_with_its_name_in_headers(e2e: E2E, store):
    e2e.restart(budgets=BUDGETS, store=store, identity={"trust_identity_headers": True})
    # 100 output tokens of gpt-4o-mini ≈ $0.000062: the agent's $0.0001 day holds one such request.
    bot = e2e.openai(default_headers={"x-nexus-agent": "bot", "x-fake-completion-tokens": "100"})
    seen = []
    for _ in range(3):
        raw = bot.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS, max_tokens=100)
        seen.append((raw.headers["x-fake-upstream"], raw.headers.get("x-nexus-budget-name")))
    assert seen[0] == ("openai", None)
    assert ("ollama", "agent-bot") in seen  # once the agent's daily budget is spent, it runs locally
    m = e2e.metrics()
    assert re.search(r'nexus_budget_limit_usd\{billing_month="\d{4}-\d{2}-\d{2}",budget="agent-bot"\} 0.0001', m)
    assert re.search(r'nexus_budget_forecast_usd\{billing_month="[^"]+",budget="team-ml"\}', m)


def test_identity_headers_ignored_unless_trusted(e2e: E2E, store):
    e2e.restart(budgets=BUDGETS, store=store)  # trust_identity_headers defaults to false
    ml = e2e.openai(default_headers={"x-nexus-team": "ml"})
    for _ in range(4):
        ml.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=10)  # never blocked
    time.sleep(0.3)
    b = budgets_by_name(e2e)
    assert b["team-ml"]["current_spending_usd"] == 0 and b["global"]["current_spending_usd"] > 0


def test_alerts_once_per_threshold_across_two_worker_processes(tmp_path, redis_url):
    """50 concurrent requests over two real --workers processes: each threshold reaches the webhook once."""
    from concurrent.futures import ThreadPoolExecutor

    from nexus_dev.fakes.webhook import WebhookReceiver
    from nexus_dev.stack import Stack
    from tests.e2e.conftest import write_config

    hook = WebhookReceiver()
    got = hook.received
    stack = Stack()
    try:
        stack.start_fakes()
        # ~$0.000014 per request (prompt + 1 output token of gpt-4o): 50 requests ≈ $0.0007 of $0.0005.
        cfg = write_config(stack.workdir / "c.yaml", identity={"trust_identity_headers": True},
                           store={"kind": "redis", "url": redis_url, "key_prefix": f"a{uuid.uuid4().hex[:6]}"},
                           alerts={"webhook_url": hook.url, "backoff_secs": 0.05},
                           budgets=[{"name": "team-ml", "scope": {"team": "ml"}, "limit_usd": 0.0005,
                                     "alert_thresholds": [25, 50, 100]}])
        stack.start_extproc(cfg, workers=2)
        stack.start_envoy(workers=2)
        env = E2E(stack)
        env.wait_envoy_sees_extproc()
        client = env.openai(default_headers={"x-nexus-team": "ml", "x-fake-completion-tokens": "1"})

        def one(_: int) -> None:
            client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=1)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(50)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len([a for a in got if a["threshold"] != "forecast"]) < 3:
            time.sleep(0.1)
        time.sleep(1.0)  # anything duplicated would arrive by now
        # Each threshold exactly once; the forecast early warning at most once (it needs a day of the period).
        assert sorted(a["threshold"] for a in got if a["threshold"] != "forecast") == ["100", "25", "50"], got
        assert len([a for a in got if a["threshold"] == "forecast"]) <= 1
        m = env.metrics()  # the parent sums both workers' counters
        for t in ("25", "50", "100"):
            assert f'nexus_budget_alerts_total{{budget="team-ml",threshold="{t}"}} 1.0' in m
    finally:
        stack.stop()
        hook.close()
