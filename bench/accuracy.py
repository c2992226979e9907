"""Accuracy report: settled cost vs what the provider's usage says it costs, per API and stream shape.

Runs a corpus of requests (JSON and SSE for every API, cached and reasoning tokens, aborted variants) through
the real Envoy + ext_proc + fake upstreams, one at a time, and reads the settled spend from /v1/stats after
each. "expected" is the provider-reported usage priced by genai-prices' own calc_price (independent of our
arithmetic), rounded up to the micro-dollar. For the exact tier it also compares our prompt count with the
provider's prompt_tokens.

    python bench/accuracy.py
"""

from __future__ import annotations

import json
import sys
import time
from decimal import ROUND_CEILING
from pathlib import Path
from typing import Any

import httpx
import yaml
from genai_prices import Usage, calc_price

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nexus_extproc.sse import SSEParser  # noqa: E402
from nexus_extproc.stack import Stack  # noqa: E402
from nexus_extproc.tokenizers import TokenCounter  # noqa: E402
from nexus_extproc.translators import for_path  # noqa: E402

MSGS = [{"role": "system", "content": "You are a careful accountant."},
        {"role": "user", "name": "finance", "content": "Summarise this month's LLM spend by team, please. " * 12}]

CASES: list[tuple[str, str, dict[str, Any], dict[str, str], str]] = [
    # name, path, body, fake headers, kind (json|sse|abort)
    ("chat JSON gpt-4o", "/v1/chat/completions", {"model": "gpt-4o", "messages": MSGS, "max_tokens": 20}, {}, "json"),
    ("chat JSON o3 cached+reasoning", "/v1/chat/completions",
     {"model": "o3", "messages": MSGS, "max_completion_tokens": 30},
     {"x-fake-cached-tokens": "64", "x-fake-reasoning-tokens": "12", "x-fake-completion-tokens": "30"}, "json"),
    ("chat SSE include_usage", "/v1/chat/completions",
     {"model": "gpt-4o-mini", "messages": MSGS, "max_tokens": 15, "stream": True,
      "stream_options": {"include_usage": True}}, {}, "sse"),
    ("chat SSE, usage added by filter", "/v1/chat/completions",
     {"model": "gpt-4.1", "messages": MSGS, "max_tokens": 15, "stream": True}, {}, "sse-hidden"),
    ("completions JSON", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Hi " * 40,
                                             "max_tokens": 8}, {}, "json"),
    ("completions SSE", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Hi " * 40,
                                            "max_tokens": 8, "stream": True,
                                            "stream_options": {"include_usage": True}}, {}, "sse"),
    ("responses JSON cached", "/v1/responses", {"model": "gpt-4.1", "input": "Count the tokens " * 30,
                                                "max_output_tokens": 12}, {"x-fake-cached-tokens": "32"}, "json"),
    ("responses SSE", "/v1/responses", {"model": "gpt-5", "input": "Count the tokens " * 30,
                                        "max_output_tokens": 12, "stream": True},
     {"x-fake-reasoning-tokens": "4"}, "sse"),
    ("embeddings", "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["budget " * 50, "spend"]}, {},
     "json"),
    ("anthropic JSON cache r/w", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 25,
                                                  "messages": MSGS[1:]},
     {"x-fake-cached-tokens": "50", "x-fake-cache-write-tokens": "20"}, "json"),
    ("anthropic SSE cache r/w", "/v1/messages", {"model": "claude-3-5-haiku", "max_tokens": 25, "stream": True,
                                                 "messages": MSGS[1:]},
     {"x-fake-cached-tokens": "50", "x-fake-cache-write-tokens": "20"}, "sse"),
    ("chat SSE truncated upstream", "/v1/chat/completions",
     {"model": "gpt-4o", "messages": MSGS, "max_tokens": 40, "stream": True},
     {"x-fake-fault": "truncate", "x-fake-completion-tokens": "40"}, "abort"),
    ("anthropic SSE truncated upstream", "/v1/messages",
     {"model": "claude-sonnet-4-5", "max_tokens": 40, "stream": True, "messages": MSGS[1:]},
     {"x-fake-fault": "truncate", "x-fake-completion-tokens": "40"}, "abort"),
]

PROVIDER = {"/v1/messages": "anthropic"}


def priced(model: str, provider: str, u: dict[str, int]) -> int:
    r = calc_price(Usage(**u), model_ref=model, provider_id=provider)
    return int((r.total_price * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


def usage_of(path: str, doc: dict[str, Any]) -> dict[str, int] | None:
    u = doc.get("usage") or (doc.get("response") or {}).get("usage") or (doc.get("message") or {}).get("usage")
    if not u:
        return None
    if path == "/v1/messages":
        read, write = u.get("cache_read_input_tokens", 0) or 0, u.get("cache_creation_input_tokens", 0) or 0
        return {"input_tokens": u.get("input_tokens", 0) + read + write, "cache_read_tokens": read,
                "cache_write_tokens": write, "output_tokens": u.get("output_tokens", 0)}
    if "prompt_tokens" in u:
        return {"input_tokens": u["prompt_tokens"], "output_tokens": u.get("completion_tokens", 0),
                "cache_read_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}
    return {"input_tokens": u["input_tokens"], "output_tokens": u.get("output_tokens", 0),
            "cache_read_tokens": (u.get("input_tokens_details") or {}).get("cached_tokens", 0)}


def settled(admin: int) -> tuple[int, int]:
    b = httpx.get(f"http://127.0.0.1:{admin}/v1/stats", timeout=5).json()["budget"]
    return round(b["current_spending_usd"] * 1e6), round(b["reserved_usd"] * 1e6)


def main() -> int:
    stack = Stack()
    counter = TokenCounter()
    rows = []
    try:
        stack.start_fakes()
        cfg = stack.workdir / "accuracy.yaml"
        cfg.write_text(yaml.safe_dump({
            "budget": {"monthly_limit_usd": 1000}, "store": {"kind": "sqlite", "path": str(stack.workdir / "a.db")},
            "backends": {"openai": {"cluster": "openai", "type": "cloud", "provider": "openai", "default": True},
                         "anthropic": {"cluster": "anthropic", "type": "cloud", "provider": "anthropic",
                                       "default": True}}}))
        stack.start_extproc(cfg)
        stack.start_envoy()
        time.sleep(2.5)  # Envoy's first health check of the ext_proc cluster
        for name, path, body, headers, kind in CASES:
            before, _ = settled(stack.admin_port)
            provider = PROVIDER.get(path, "openai")
            usage = None
            with httpx.Client(timeout=30) as c:
                try:
                    with c.stream("POST", stack.base_url + path, json=body, headers=headers) as r:
                        raw = r.read()
                except httpx.HTTPError:
                    raw = b""
            if kind == "json":
                usage = usage_of(path, json.loads(raw))
            elif kind in ("sse", "sse-hidden"):
                for ev in SSEParser().feed(raw):
                    if ev.data and ev.data != "[DONE]":
                        u = usage_of(path, json.loads(ev.data))
                        if u is not None:
                            usage = {**(usage or {}), **{k: v for k, v in u.items()
                                                         if v or k not in (usage or {})}}
            if kind == "sse-hidden":
                # The client saw no usage (by design); the fake upstream logs what it reported to us.
                seen = httpx.get(f"http://127.0.0.1:{stack.fake_ports['openai']}/_fake/requests").json()[-1]
                assert seen["stream_options"] == {"include_usage": True}
                again = httpx.post(stack.base_url + path, json={**body, "stream": False}, timeout=30).json()
                usage = usage_of(path, again)
            end = time.monotonic() + 8
            while time.monotonic() < end:
                after, reserved = settled(stack.admin_port)
                if reserved == 0 and after != before:
                    break
                time.sleep(0.05)
            delta = after - before
            if kind == "sse-hidden" and usage is not None:
                delta -= priced(body["model"], provider, usage)  # the non-streamed twin settled too
            expected = priced(body["model"], provider, usage) if usage else None
            tr = for_path(path)
            assert tr is not None
            parsed = tr.parse(json.loads(json.dumps(body)))
            tc = counter.count_prompt(parsed.model, parsed.shape)
            provider_prompt = None
            if usage and path != "/v1/messages":
                provider_prompt = usage["input_tokens"]
            rows.append((name, expected, delta, tc.tier, tc.tokens + parsed.token_ids, provider_prompt, kind))
    finally:
        stack.stop()
    print(f"{'case':<36} {'expected µ$':>11} {'settled µ$':>10} {'diff':>6}   {'tier':<13} {'our prompt':>10} "
          f"{'provider':>8}")
    exact_cases = 0
    zero_diff = 0
    for name, expected, delta, tier, ours, theirs, kind in rows:
        diff = "" if expected is None else f"{delta - expected:+d}"
        if expected is not None and kind != "abort":
            exact_cases += 1
            zero_diff += delta == expected
        print(f"{name:<36} {expected if expected is not None else '(none)':>11} {delta:>10} {diff:>6}   {tier:<13} "
              f"{ours:>10} {theirs if theirs is not None else '-':>8}")
    print(f"\n{zero_diff}/{exact_cases} cases with provider usage settled to the micro-dollar; aborted cases "
          "settle on the estimate (no provider usage exists for them).")
    return 0 if zero_diff == exact_cases else 1


if __name__ == "__main__":
    raise SystemExit(main())
