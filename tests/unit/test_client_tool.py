"""Issue 26: which tool sent a request, from what the clients send themselves (headers seen on the wire)."""

from __future__ import annotations

import pytest

from nexus_extproc.request.client_tool import TOOLS, client_session, client_tool


@pytest.mark.parametrize(("headers", "tool"), [
    ({"user-agent": "claude-cli/2.1.12 (external, cli)", "x-claude-code-session-id": "abc"}, "claude-code"),
    ({"user-agent": "codex_exec/0.171.0 (Debian 12; x86_64)", "originator": "codex_exec"}, "codex"),
    ({"user-agent": "reqwest", "originator": "codex_cli_rs"}, "codex"),
    ({"user-agent": "OpenAI/Python 2.9.0"}, "openai-python"),
    ({"user-agent": "Anthropic/Python 0.75.0"}, "anthropic-python"),
    ({"user-agent": "OpenAI/JS 6.1.0"}, "openai-node"),
    ({"user-agent": "Anthropic/JS 0.70.0"}, "anthropic-node"),
    ({"user-agent": "ai-sdk/openai/2.0.1 ai-sdk/provider-utils/3.0.1"}, "vercel-ai-sdk"),
    ({"user-agent": "curl/8.5.0"}, "other"),
    ({}, "other"),
])
def test_tool_label_is_from_a_fixed_set(headers, tool):
    assert client_tool(headers) == tool and tool in TOOLS


def test_session_is_hashed_stable_and_bounded():
    a = client_session({"x-claude-code-session-id": "4f1c-secret-session"})
    assert a == client_session({"x-claude-code-session-id": "4f1c-secret-session"})
    assert a.startswith("s-") and len(a) == 18 and "secret" not in a
    assert client_session({"session-id": "codex-thread"}) != a
    assert client_session({"session-id": "x" * 100_000}).startswith("s-")
    assert client_session({"user-agent": "curl"}) == ""
