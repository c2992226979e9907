"""User-facing errors, rendered in the calling provider's own error shape.

SDKs parse error bodies; a 503 in the wrong shape surfaces as an opaque exception in the client, so every
rejection we originate speaks the API the client called (SPEC §3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(slots=True)
class NexusError(Exception):
    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)  # more fields in the error object (reset_at)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def error_doc(api_family: str, err: NexusError) -> dict[str, object]:
    """The error object OpenAI and Anthropic clients each parse (also Envoy's own local replies, envoy_config)."""
    if api_family == "anthropic":
        return {"type": "error", "error": {"type": err.code, "message": err.message, **err.extra}}
    return {"error": {"message": err.message, "type": err.code, "code": err.code, "param": None, **err.extra}}


def render_error(api_family: str, err: NexusError) -> bytes:
    """Body for an immediate response: OpenAI and Anthropic clients each parse their own shape."""
    return json.dumps(error_doc(api_family, err), separators=(",", ":")).encode()


def bad_request(message: str, code: str = "invalid_request_error") -> NexusError:
    return NexusError(400, code, message)


def not_found(message: str) -> NexusError:
    return NexusError(404, "not_found_error", message)


# The wording of a budget refusal, by the policy's refusal code (budget.policy.REJECT_*).
_REFUSALS = {"cloud_blocked": "cloud backends are blocked: {name} exhausted", "budget_exhausted": "{name} exhausted"}


def budget_exceeded(code: str, budget: str | None, reset_in_s: int, reset_at: str, retry_after_max_s: int,
                    short: bool = False) -> NexusError:
    """`budget` is the deciding budget's name, None for the global (monthly) one. `short`: a short window's
    limit (rolling, hourly, `every`), a 429 like the provider's own rate limits, which the SDKs wait out.

    SDKs retry a 503 and sleep for its Retry-After: the header goes out only when the wait is one a client can
    sleep through (`server.retry_after_max_secs`). Past it, `x-should-retry: false` (the OpenAI and Anthropic
    SDKs, and so Claude Code, honour it) makes the refusal final at once, and the reset time travels in
    X-Nexus-Budget-Reset and the body for whoever wants to wait."""
    name = f"budget '{budget}'" if budget else "monthly budget"
    message = _REFUSALS.get(code, "{name} exhausted").format(name=name)
    wait = max(1, reset_in_s)
    headers = {"x-nexus-budget-reset": reset_at}
    if wait <= retry_after_max_s:
        headers["retry-after"] = str(wait)
    else:
        headers["x-should-retry"] = "false"
    if short:
        return NexusError(429, "budget_exceeded", message.replace("exhausted", "at its limit for now"), headers,
                          {"reset_at": reset_at})
    return NexusError(503, "budget_exceeded", message, headers, {"reset_at": reset_at})


def model_not_allowed(budget: str | None, model: str, allowed: tuple[str, ...]) -> NexusError:
    """403, final: the same request can never pass, so nothing in the answer invites a retry."""
    shown = model if len(model) <= 100 else model[:100] + "…"  # the client's own string: bounded in the answer
    return NexusError(403, "model_not_allowed",
                      f"model '{shown}' is not allowed by budget '{budget}'; allowed: {', '.join(allowed)}",
                      {"x-should-retry": "false"}, {"allowed_models": list(allowed)})


def runaway(dimension: str, wait_s: int, blocked: bool, retry_after_max_s: int) -> NexusError:
    """Runaway detection's refusal for the cool-down: a throttle is a 429 a client may wait out (Retry-After
    under the cap), a block a 403 that ends the agent's loop at once. Names the dimension, never its value."""
    what = f"spending on this {dimension.replace('_', ' ')} ran away (runaway detection)"
    if blocked:
        return NexusError(403, "runaway_blocked", f"{what}; blocked for {wait_s} s", {"x-should-retry": "false"},
                          {"retry_in_secs": wait_s})
    headers = {"retry-after": str(wait_s)} if wait_s <= retry_after_max_s else {"x-should-retry": "false"}
    return NexusError(429, "runaway_throttled", f"{what}; throttled for {wait_s} s", headers,
                      {"retry_in_secs": wait_s})


def websocket_not_served() -> NexusError:
    return NexusError(426, "websocket_not_supported",
                      "the WebSocket transport is not served through the budget filter; use HTTP")


def internal_error() -> NexusError:
    return NexusError(500, "internal_error", "the budget filter failed on this request; it was not forwarded")


def store_unavailable() -> NexusError:
    return NexusError(503, "budget_store_unavailable", "budget store unavailable; request not admitted")


def encoded_body() -> NexusError:
    """A compressed request body (Codex compresses with zstd, toward the ChatGPT backend only): refused up front in
    the client's shape instead of failing as 'not JSON' after the body was buffered."""
    return NexusError(415, "unsupported_content_encoding",
                      "compressed request bodies (content-encoding) are not read by the budget filter; "
                      "send the body uncompressed (Codex: features.enable_request_compression = false)")


def payload_too_large(limit: int) -> NexusError:
    return NexusError(413, "request_too_large", f"request body exceeds the {limit}-byte limit")
