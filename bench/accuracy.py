"""Accuracy on real provider traffic: the recorded exchanges in ../shared/provider-recordings.

Each case goes through the server's own request and response phases in-process (the same code Envoy drives;
tests/e2e/test_recorded_traffic.py replays the same corpus through the real Envoy and checks the same
settlement), twice: the first pass with an empty calibration, the second with what the first one learned.

Reports, per tier and per API: the median and p95 absolute error of the prompt estimate (tokens reserved for
vs the provider's billed input tokens, cache included) before and after calibration; how many cases settle
exactly to genai-prices' price of the recorded usage; the exact tier against OpenAI's prompt_tokens; web-search
estimates against what they were billed; and the CPU calibration adds per request.

    python bench/accuracy.py [--json]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nexus_extproc.app import build  # noqa: E402
from nexus_extproc.config import parse_config  # noqa: E402
from nexus_extproc.request.calibration import Calibrator  # noqa: E402
from nexus_extproc.request.pipeline import RequestState  # noqa: E402
from tests.corpus import (  # noqa: E402
    SKIP_REASON,
    expected_micros,
    is_plain_text_openai,
    load_cases,
    provider_prompt_tokens,
)

BACKENDS = {"openai": {"cluster": "openai", "type": "cloud", "provider": "openai", "default": True},
            "anthropic": {"cluster": "anthropic", "type": "cloud", "provider": "anthropic", "default": True}}


async def run_case(processor: Any, case: dict[str, Any]) -> dict[str, Any]:
    s = RequestState()
    processor.request_headers(s, {":method": "POST", ":path": case["path"], "content-type": "application/json"},
                              False)
    reply = await processor.request_body(s, json.dumps(case["request"]).encode())
    assert reply.immediate is None, case["name"]
    estimate = s.estimate
    processor.response_headers(s, {":status": str(case["response_status"]),
                                   "content-type": case["response_content_type"]})
    body = case["response_body"].encode()
    parts = [body[i:i + 997] for i in range(0, len(body), 997)] if s.streaming else [body]
    for i, c in enumerate(parts):
        processor.response_body(s, c, i == len(parts) - 1)
    cost, source = processor.compute_final_cost(s)
    await processor.finish(s)
    billed_in = s.usage.input_tokens or 0
    return {"name": case["name"], "api": case["api"], "tier": s.tier, "shape": s.parsed.shape.kind,
            "count": s.prompt_tokens, "reserved_prompt": s.prompt_estimate, "billed_input": billed_in,
            "prompt_error": abs(s.prompt_estimate - billed_in) / billed_in if billed_in else 0.0,
            "estimate_micros": estimate, "settled_micros": cost, "source": source,
            "expected_micros": expected_micros(case), "web_search": s.parsed.shape.server_tools > 0,
            "plain_openai": is_plain_text_openai(case), "provider_prompt": provider_prompt_tokens(case)}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def calibration_cpu_us(rounds: int = 200_000) -> float:
    """adjust + observe, the whole per-request cost of calibration (a dict lookup and a few additions)."""
    c = Calibrator()
    c.observe("claude-sonnet-4-5", "approximation", "plain", 100, 90, 0)
    best = float("inf")
    for _ in range(5):  # best of five: the machine's noise only ever adds
        t0 = time.process_time()
        for _ in range(rounds):
            c.adjust("claude-sonnet-4-5", "approximation", "anthropic_messages:plain", 1000, 0)
            c.observe("claude-sonnet-4-5", "approximation", "anthropic_messages:plain", 1000, 900, 0)
        best = min(best, (time.process_time() - t0) / rounds * 1e6)
    return best


async def main_async() -> dict[str, Any]:
    cases = load_cases()
    if not cases:
        raise SystemExit(f"skipped: {SKIP_REASON}")
    processor = build(parse_config({"backends": BACKENDS}, environ={})).processor
    passes = []
    for _ in range(2):
        passes.append([await run_case(processor, c) for c in cases])
        await processor.calibration.sync(None)  # what the server's flush loop does every flush_secs
    groups: dict[str, dict[str, Any]] = {}
    for before, after in zip(passes[0], passes[1], strict=True):
        for key in (f"tier={before['tier']}", f"api={before['api']}"):
            g = groups.setdefault(key, {"n": 0, "before": [], "after": []})
            g["n"] += 1
            g["before"].append(before["prompt_error"])
            g["after"].append(after["prompt_error"])
    table = {k: {"cases": g["n"], "median_before": statistics.median(g["before"]), "p95_before": pct(g["before"], .95),
                 "median_after": statistics.median(g["after"]), "p95_after": pct(g["after"], .95)}
             for k, g in sorted(groups.items())}
    ant_approx = [r for r in passes[1] if r["api"] == "anthropic_messages" and r["tier"] == "approximation"]
    web = [{"name": b["name"], "estimate_before_micros": b["estimate_micros"],
            "estimate_after_micros": a["estimate_micros"], "billed_micros": a["expected_micros"]}
           for b, a in zip(passes[0], passes[1], strict=True) if b["web_search"]]
    plain = [r for r in passes[0] if r["plain_openai"]]
    return {
        "cases": len(cases),
        "settled_exactly": sum(r["settled_micros"] == r["expected_micros"] and r["source"] == "usage"
                               for r in passes[0]),
        "exact_tier_equal": sum(r["count"] == r["provider_prompt"] for r in plain),
        "exact_tier_cases": len(plain),
        "exact_tier_misses": [{"name": r["name"], "ours": r["count"], "provider": r["provider_prompt"]}
                              for r in plain if r["count"] != r["provider_prompt"]],
        "prompt_error": table,
        "anthropic_approximation_after": {"median": statistics.median([r["prompt_error"] for r in ant_approx]),
                                          "p95": pct([r["prompt_error"] for r in ant_approx], .95)},
        "web_search": web,
        "calibration_cpu_us_per_request": calibration_cpu_us(),
        "cases_detail": passes,
    }


def main() -> int:
    out = asyncio.run(main_async())
    if "--json" in sys.argv:
        print(json.dumps({k: v for k, v in out.items() if k != "cases_detail"}, indent=2))
        return 0
    print(f"{out['settled_exactly']}/{out['cases']} recorded exchanges settle to genai-prices' price to the µ$")
    print(f"exact tier = OpenAI prompt_tokens on {out['exact_tier_equal']}/{out['exact_tier_cases']} plain-text "
          f"cases; misses: {out['exact_tier_misses']}")
    print("\nprompt estimate |reserved − billed input| / billed input (pass 1: no calibration; pass 2: calibrated)")
    print(f"{'group':<28} {'cases':>5} {'median before':>14} {'p95 before':>11} {'median after':>13} {'p95 after':>10}")
    for k, g in out["prompt_error"].items():
        print(f"{k:<28} {g['cases']:>5} {g['median_before']:>13.1%} {g['p95_before']:>11.1%} "
              f"{g['median_after']:>13.1%} {g['p95_after']:>10.1%}")
    a = out["anthropic_approximation_after"]
    print(f"\nAnthropic approximation tier after calibration: median {a['median']:.1%}, p95 {a['p95']:.1%}")
    print("\nweb-search requests: estimate vs billed (µ$)")
    for w in out["web_search"]:
        b, a, billed = w["estimate_before_micros"], w["estimate_after_micros"], w["billed_micros"]
        print(f"  {w['name']:<44} before {b:>9} ({b / billed:.2f}×)  after {a:>9} ({a / billed:.2f}×)"
              f"  billed {billed:>9}")
    cpu = out["calibration_cpu_us_per_request"]
    print(f"\ncalibration CPU per request (adjust + observe, in-process): {cpu:.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
