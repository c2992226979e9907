"""The recorded provider exchanges in ../shared/provider-recordings (read in place, never copied).

`expected_micros` is computed here the plain way, independent of the server's code path: genai-prices'
`extract_usage` on the response (for SSE: the final usage event, or Anthropic's `message_start` message with
its `message_delta` usage laid over it), then the library's own `calc_price` for the model the response names,
rounded up to the micro-dollar.
"""

from __future__ import annotations

import json
import os
from decimal import ROUND_CEILING
from pathlib import Path
from typing import Any

import pytest
from genai_prices import extract_usage

ROOT = Path(__file__).resolve().parent.parent
CASES_DIR = Path(os.environ.get("NEXUS_RECORDINGS", ROOT.parent / "shared" / "provider-recordings")) / "cases"
SKIP_REASON = (f"provider recordings not found at {CASES_DIR} (they live in ../shared/provider-recordings, "
               "present in CI; set NEXUS_RECORDINGS to point elsewhere)")

FLAVOR = {"openai_chat": ("openai", "chat"), "openai_responses": ("openai", "responses"),
          "openai_embeddings": ("openai", "embeddings"), "anthropic_messages": ("anthropic", "default")}


def load_cases() -> list[dict[str, Any]]:
    if not CASES_DIR.is_dir():
        return []  # a user's fresh clone: the tests skip with SKIP_REASON; CI has ../shared and runs them
    return [json.loads(p.read_text()) for p in sorted(CASES_DIR.glob("*.json"))]


def case_params() -> list[Any]:
    cases = load_cases()
    if not cases:
        return [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON), id="no-recordings")]
    return [pytest.param(c, id=c["name"]) for c in cases]


def sse_data(body: str) -> list[dict[str, Any]]:
    out = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        data = [ln[5:].lstrip() for ln in block.split("\n") if ln.startswith("data:")]
        if data and data[0] != "[DONE]":
            try:
                out.append(json.loads("\n".join(data)))
            except ValueError:
                pass
    return out


def final_usage_doc(case: dict[str, Any]) -> dict[str, Any]:
    """The response object genai-prices' extractor reads: the JSON body, or its equivalent from the stream."""
    body = case["response_body"]
    if "event-stream" not in case["response_content_type"]:
        return json.loads(body)
    events = sse_data(body)
    api = case["api"]
    if api == "openai_chat":
        return next(e for e in reversed(events) if e.get("usage"))
    if api == "openai_responses":
        return next(e["response"] for e in reversed(events) if e.get("type") == "response.completed")
    start = next(e["message"] for e in events if e.get("type") == "message_start")
    usage = dict(start["usage"])
    for e in events:
        if e.get("type") == "message_delta" and isinstance(e.get("usage"), dict):
            usage.update(e["usage"])
    return {"model": start["model"], "usage": usage}


def expected_micros(case: dict[str, Any]) -> int:
    provider, flavor = FLAVOR[case["api"]]
    eu = extract_usage(final_usage_doc(case), provider_id=provider, api_flavor=flavor)
    total = eu.calc_price().total_price
    return int((total * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


def provider_prompt_tokens(case: dict[str, Any]) -> int | None:
    u = final_usage_doc(case).get("usage") or {}
    v = u.get("prompt_tokens", u.get("input_tokens"))
    return v if isinstance(v, int) else None


def is_plain_text_openai(case: dict[str, Any]) -> bool:
    """The ground-truth cases for the exact tier: OpenAI chat with string contents and no tools, and string
    embeddings (no base64 input ambiguity: the input is text either way)."""
    req = case["request"]
    if case["api"] == "openai_embeddings":
        inp = req.get("input")
        return isinstance(inp, str) or (isinstance(inp, list) and all(isinstance(x, str) for x in inp))
    if case["api"] != "openai_chat" or req.get("tools") or req.get("functions"):
        return False
    return all(_text_only(m.get("content")) and not m.get("tool_calls") for m in req.get("messages", []))


def _text_only(content: Any) -> bool:
    return isinstance(content, str) or (isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in content))
