"""What the filter does with a request no API profile meters: free endpoints pass uncharged, WebSocket upgrades
get the answer that sends a client back to HTTP at once, anything else is refused or passed by configuration.

Refusing a free endpoint costs money: Claude Code's `/context` answered 404 on `count_tokens` re-sent the same
payloads to `/v1/messages` with `max_tokens: 1`, every one billed. So the endpoints real clients use for free
(token counting, model listing, reads) are forwarded as they are, counted in a metric and never reserved.
"""

from __future__ import annotations

from typing import Literal

# Bounded metric labels (nexus_passthrough_requests_total{endpoint}).
Passthrough = Literal["count_tokens", "models", "read", "unknown"]

# Methods that carry no billable work at the providers (listing models, fetching a stored response or file).
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FREE_POSTS: dict[str, Passthrough] = {"/v1/messages/count_tokens": "count_tokens"}


def bare_path(path: str) -> str:
    return path.split("?", 1)[0].rstrip("/") or "/"


def free_endpoint(method: str, path: str) -> Passthrough | None:
    bare = bare_path(path)
    if method in READ_METHODS:
        return "models" if bare == "/v1/models" or bare.startswith("/v1/models/") else "read"
    if method == "POST":
        return FREE_POSTS.get(bare)
    return None


def is_websocket_upgrade(headers: dict[str, str]) -> bool:
    """Codex opens `GET /v1/responses` with `Upgrade: websocket` first. Metering that transport is out of scope
    (docs/streaming.md); a 426 is the answer Codex falls back to HTTP on at once (openai/codex#43353), where
    Envoy's default 403 cost it seven retries over ~6 s."""
    return "websocket" in headers.get("upgrade", "").lower()


def family_hint(path: str, headers: dict[str, str]) -> Literal["openai", "anthropic"] | None:
    """Whose cloud a pass-through goes to when the path alone does not say (`GET /v1/models`, Claude Code's
    `HEAD /`): Anthropic's clients always send `anthropic-version`, and authenticate with `x-api-key`."""
    if bare_path(path).startswith("/v1/messages") or "anthropic-version" in headers or "x-api-key" in headers:
        return "anthropic"
    return None
