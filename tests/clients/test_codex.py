"""Codex (`codex exec`, from npm) through the demo stack: with a `model_providers` entry it answers over HTTP and
its spend is settled and attributed to codex and its session; with the built-in provider (its WebSocket
transport first) one 426 sends it to HTTP at once; an exhausted budget ends it within bounded retries, refused
every time, nothing reserved."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nexus_extproc.request.client_tool import client_session
from tests.clients.conftest import Live, client_binary

pytestmark = pytest.mark.e2e


def codex(live: Live, config: str, prompt: str = "Say hello in three words.") -> tuple[str, float, int]:
    home = live.home / ".codex"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(config)
    p, elapsed = live.run([str(client_binary("codex")), "exec", "--skip-git-repo-check", prompt],
                          env={"CODEX_HOME": str(home), "OPENAI_API_KEY": "sk-test-not-real"})
    return p.stdout + p.stderr, elapsed, p.returncode


def provider_config(url: str) -> str:
    return f'''model = "gpt-5"
model_provider = "nexus"

[model_providers.nexus]
name = "nexus demo"
base_url = "{url}/v1"
env_key = "OPENAI_API_KEY"
wire_api = "responses"
'''


def session_of(output: str) -> str:
    m = re.search(r"^session id: (\S+)$", output, re.M)
    assert m, output[-2000:]
    return m.group(1)


def test_codex_turn_is_settled_and_attributed(live: Live):
    before, _ = live.settled()
    out, _, rc = codex(live, provider_config(live.url))
    assert rc == 0, out[-2000:]
    assert re.search(r"^codex\ntok tok", out, re.M), out[-2000:]  # the streamed answer was shown
    spent, reserved = live.settled()
    assert reserved == 0 and spent > before
    m = re.search(r"^tokens used\n([\d,]+)$", out, re.M)
    assert m, out[-2000:]
    rows = [r for r in live.spend_rows("tool,session") if r["tool"] == "codex"]
    assert [r["session"] for r in rows] == [client_session({"session-id": session_of(out)})]
    # Codex's own count of the turn is the provider's usage the ledger settled.
    assert rows[0]["input_tokens"] + rows[0]["output_tokens"] == int(m.group(1).replace(",", ""))


def test_codex_builtin_provider_falls_back_from_websocket_at_once(live: Live):
    """The built-in provider opens GET /v1/responses as a WebSocket first; Envoy's 403 cost it seven tries over
    ~6 s. One 426, then HTTP."""
    before = live.access_log()
    out, _, rc = codex(live, f'model = "gpt-5"\nopenai_base_url = "{live.url}/v1"\n')
    assert rc == 0, out[-2000:]
    new = live.access_log()[len(before):]
    assert len(re.findall(r'"GET /v1/responses" 426 ', new)) == 1, new
    assert re.search(r'"POST /v1/responses" 200 ', new), new


def test_codex_exhausted_budget_ends_within_bounded_retries(live: Live, tmp_path: Path):
    live.restart(budget={"monthly_limit_usd": 0.000001, "hard_limit_action": "block_all"},
                 store={"kind": "sqlite", "path": str(tmp_path / "exhausted.db")})
    try:
        before = live.access_log()
        out, elapsed, rc = codex(live, provider_config(live.url))
        assert rc != 0 and "budget exhausted" in out, out[-2000:]
        # Codex retries any 5xx on its own fixed budget (5 stream reconnects, each with request retries) and
        # ignores x-should-retry; without Retry-After it gives up in ~25 s, where it slept ~24 days before.
        assert elapsed < 90, elapsed
        new = live.access_log()[len(before):]
        assert 1 <= new.count('" 503 ') <= 40 and '" 200 ' not in new
        assert live.settled() == (0, 0)
        # The README's way to stop at the first refusal: no retries on the provider entry.
        before = live.access_log()
        out, elapsed, rc = codex(live, provider_config(live.url) + "request_max_retries = 0\nstream_max_retries = 0\n")
        assert rc != 0 and "budget exhausted" in out, out[-2000:]
        assert elapsed < 15, elapsed
        assert live.access_log()[len(before):].count('" 503 ') == 1
    finally:
        live.restart(budget={"monthly_limit_usd": 1000},
                     store={"kind": "sqlite", "path": str(live.stack.workdir / "ledger.db")})
