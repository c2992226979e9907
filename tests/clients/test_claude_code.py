"""Claude Code (`claude -p`, from npm) through the demo stack: it answers, the ledger settles what Claude Code
itself says it spent, the spend is attributed to claude-code and its session, and an exhausted budget stops it at
once instead of putting it to sleep."""

from __future__ import annotations

import json

import pytest

from nexus_extproc.request.client_tool import client_session
from tests.clients.conftest import Live, client_binary

pytestmark = pytest.mark.e2e


def claude(live: Live, prompt: str) -> tuple[dict, float, int]:
    p, elapsed = live.run([str(client_binary("claude")), "-p", prompt, "--model", "claude-sonnet-4-5",
                           "--output-format", "json"],
                          env={"ANTHROPIC_BASE_URL": live.url, "ANTHROPIC_API_KEY": "sk-ant-test-not-real",
                               # Only the model API: no telemetry, error reporting or update checks.
                               "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1",
                               "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1"})
    out = p.stdout.strip().splitlines()
    assert out, p.stderr[-2000:]
    return json.loads(out[-1]), elapsed, p.returncode


def test_claude_code_session_is_settled_and_attributed(live: Live):
    before, _ = live.settled()
    result, _, rc = claude(live, "Say hello in three words.")
    assert rc == 0 and result["is_error"] is False, result
    assert result["result"].startswith("tok")  # the fake's answer reached the user
    spent, reserved = live.settled()
    # Claude Code prices its own usage at list price; the ledger settles the provider's usage the same way.
    assert reserved == 0 and spent - before == pytest.approx(result["total_cost_usd"], abs=1e-6)
    rows = [r for r in live.spend_rows("tool,session") if r["tool"] == "claude-code"]
    assert [r["session"] for r in rows] == [client_session({"x-claude-code-session-id": result["session_id"]})]
    assert float(rows[0]["cost_usd"]) == pytest.approx(result["total_cost_usd"], abs=1e-6)


def test_claude_code_fails_at_once_on_an_exhausted_budget(live: Live):
    """A month's Retry-After would have it wait for weeks; it must give up within seconds, having been refused
    without a cent reserved."""
    live.restart(budget={"monthly_limit_usd": 0.000001, "hard_limit_action": "block_all"},
                 store={"kind": "sqlite", "path": str(live.stack.workdir / "exhausted.db")})
    try:
        before = live.access_log().count('" 503 ')
        result, elapsed, rc = claude(live, "Say hello.")
        assert rc != 0 and result["is_error"] is True and result.get("api_error_status") == 503, result
        assert elapsed < 60, elapsed
        refused = live.access_log().count('" 503 ') - before
        assert 1 <= refused <= 3, refused  # x-should-retry: false — no retry loop
        assert live.settled() == (0, 0)
    finally:
        live.restart(budget={"monthly_limit_usd": 1000},
                     store={"kind": "sqlite", "path": str(live.stack.workdir / "ledger.db")})


def test_a_claude_code_session_budget_stops_that_session_only(live: Live):
    """`scope: {tool: claude-code, session: "*"}`: one budget instance per Claude Code session, named by the hash
    of the session id Claude Code sends; a tiny limit refuses the session at once, other clients go on."""
    live.restart(budgets=[{"name": "global", "limit_usd": 1000},
                          {"name": "cc-session", "scope": {"tool": "claude-code", "session": "*"},
                           "limit_usd": 0.000001, "hard_limit_action": "block_all"}],
                 store={"kind": "sqlite", "path": str(live.stack.workdir / "sessions.db")})
    try:
        result, elapsed, rc = claude(live, "Say hello.")
        assert rc != 0 and result["is_error"] is True and result.get("api_error_status") == 503, result
        assert elapsed < 60, elapsed
        b = {x["name"]: x for x in live.stats()["budgets"]}["cc-session"]
        session = client_session({"x-claude-code-session-id": result["session_id"]})
        assert b["distinct"]["by"] == ["session"] and b["distinct"]["instances"] == 1
        assert b["distinct"]["top"][0]["value"] == session
        # Another client (no Claude Code session) is not counted by it.
        assert live.openai().chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5).choices
        spent, reserved = live.settled()
        assert spent > 0 and reserved == 0
    finally:
        live.restart(budget={"monthly_limit_usd": 1000},
                     store={"kind": "sqlite", "path": str(live.stack.workdir / "ledger.db")})
