"""Which tool sent a request, and in which of its sessions: read from what the clients send on their own.

Nothing to configure and nothing to trust: the label only attributes spend in reports (budgets by tool or session
come later), so a client that lies about it misreports itself and nothing more. The label is from a fixed set
(it reaches storage and may reach metrics); the session id is hashed, never stored as sent.

| label              | seen as                                                              |
|--------------------|----------------------------------------------------------------------|
| `claude-code`      | `User-Agent: claude-cli/<v>`, or an `X-Claude-Code-Session-Id` header |
| `codex`            | `originator: codex_*` (codex_exec, codex_cli_rs, …), or `User-Agent: codex_*` |
| `openai-python`    | `User-Agent: OpenAI/Python <v>` (langchain-openai, litellm as a client, the Agents SDK) |
| `openai-node`      | `User-Agent: OpenAI/JS <v>`                                          |
| `anthropic-python` | `User-Agent: Anthropic/Python <v>` (langchain-anthropic)             |
| `anthropic-node`   | `User-Agent: Anthropic/JS <v>`                                       |
| `vercel-ai-sdk`    | `User-Agent` containing `ai-sdk/`                                   |
| `other`            | anything else                                                        |
"""

from __future__ import annotations

import hashlib

TOOLS = ("claude-code", "codex", "openai-python", "openai-node", "anthropic-python", "anthropic-node",
         "vercel-ai-sdk", "other")

# User-Agent prefixes, checked in order (case-insensitive).
_UA_PREFIXES = (("claude-cli/", "claude-code"), ("codex", "codex"), ("openai/python", "openai-python"),
                ("openai/js", "openai-node"), ("anthropic/python", "anthropic-python"),
                ("anthropic/js", "anthropic-node"))
# Session headers, by the client that sends them.
SESSION_HEADERS = ("x-claude-code-session-id", "session-id", "session_id")


def client_tool(headers: dict[str, str]) -> str:
    if headers.get("originator", "").lower().startswith("codex"):
        return "codex"
    ua = headers.get("user-agent", "").lower()
    for prefix, label in _UA_PREFIXES:
        if ua.startswith(prefix):
            return label
    if "x-claude-code-session-id" in headers:
        return "claude-code"
    if "ai-sdk/" in ua:
        return "vercel-ai-sdk"
    return "other"


def client_session(headers: dict[str, str]) -> str:
    """`s-` and 16 hex digits of the session id's SHA-256 ("" when the client sends none): stable per session,
    bounded in length, and not the id itself."""
    for h in SESSION_HEADERS:
        v = headers.get(h, "").strip()
        if v:
            return "s-" + hashlib.sha256(v[:256].encode()).hexdigest()[:16]
    return ""
