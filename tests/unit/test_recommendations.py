"""Each recommendation rule on a constructed spend history: it fires with the right saving when its pattern
is there, and stays quiet when it is not."""

from __future__ import annotations

import json

from nexus_extproc.budget.recommendations import recommend
from nexus_extproc.ledger import SpendAgg

CLOUD = {"openai"}
EQ = {"gpt-4o-mini": "ollama/llama3.1:8b"}
PRICES = {("openai", "gpt-4o"): {"input": 2_500_000, "cache_read": 1_250_000, "output": 10_000_000},
          ("openai", "gpt-4o-mini"): {"input": 150_000, "cache_read": 75_000, "output": 600_000},
          ("ollama", "llama3.1:8b"): {"input": 0, "cache_read": 0, "output": 0}}


def prices(backend: str, model: str) -> dict[str, int]:
    return PRICES.get((backend, model), {})


def agg(model: str = "gpt-4o", backend: str = "openai", requests: int = 1, cost: int = 1000, **kw) -> SpendAgg:
    base = {"budget": "", "model": model, "day": "2026-12-01", "requests": requests, "input_tokens": 500 * requests,
            "output_tokens": 100 * requests, "cost": cost, "estimate": cost, "backend": backend,
            "model_requested": model, "output_reserved": 150 * requests}
    base.update(kw)
    return SpendAgg(**base)  # type: ignore[arg-type]


def kinds(recs) -> dict[str, object]:
    return {(r.kind, r.subject): r for r in recs}


def test_local_equivalent_rarely_used():
    recs = kinds(recommend([agg("gpt-4o-mini", requests=95, cost=50_000),
                            agg("llama3.1:8b", "ollama", requests=5, cost=0, model_requested="gpt-4o-mini")],
                           EQ, CLOUD, prices))
    r = recs[("use_local_equivalent", "gpt-4o-mini")]
    assert r.potential_saving_micros == 50_000  # the local model costs nothing
    assert json.loads(r.data_json())["rerouted_requests"] == 5
    # used enough (30 % rerouted): quiet
    quiet = kinds(recommend([agg("gpt-4o-mini", requests=70, cost=50_000),
                             agg("llama3.1:8b", "ollama", requests=30, cost=0, model_requested="gpt-4o-mini")],
                            EQ, CLOUD, prices))
    assert ("use_local_equivalent", "gpt-4o-mini") not in quiet


def test_long_prompts_with_a_low_cache_share():
    long = agg(requests=40, cost=900_000, input_tokens=40 * 10_000, cache_read_tokens=40 * 500)
    r = kinds(recommend([long], EQ, CLOUD, prices))[("prompt_caching", "gpt-4o")]
    # half of 400k input tokens cached instead of 20k: 180k tokens × (2.50 − 1.25) $/M
    assert r.potential_saving_micros == 180_000 * 1_250_000 // 1_000_000
    cached = agg(requests=40, cost=900_000, input_tokens=40 * 10_000, cache_read_tokens=40 * 5_000)
    short = agg(requests=40, cost=900_000, input_tokens=40 * 800)
    assert not any(r.kind == "prompt_caching" for r in recommend([cached], EQ, CLOUD, prices))
    assert not any(r.kind == "prompt_caching" for r in recommend([short], EQ, CLOUD, prices))


def test_reservations_far_above_the_output():
    over = agg(requests=30, cost=300_000, estimate=2_000_000, output_tokens=30 * 50, output_reserved=30 * 4_096)
    r = kinds(recommend([over], EQ, CLOUD, prices))[("reservation_too_high", "gpt-4o")]
    assert r.potential_saving_micros == 1_700_000 and json.loads(r.data_json())["saving_kind"] == "headroom"
    fine = agg(requests=30, cost=300_000, output_tokens=30 * 900, output_reserved=30 * 1_000)
    assert not any(r.kind == "reservation_too_high" for r in recommend([fine], EQ, CLOUD, prices))


def test_top_spenders_by_agent_task_and_team():
    rows = [agg(requests=10, cost=800_000, task="triage", team="search", agent="triager"),
            agg("gpt-4o-mini", requests=10, cost=150_000, task="triage", team="search", agent="triager"),
            agg(requests=10, cost=50_000, task="lint", team="infra", agent="linter")]
    recs = kinds(recommend(rows, EQ, CLOUD, prices))
    assert recs[("top_spender", "agent:triager")].potential_saving_micros == 150_000
    assert ("top_spender", "agent:linter") not in recs
    assert recs[("top_spender", "task:triage")].potential_saving_micros == 150_000  # its gpt-4o-mini spend
    assert ("top_spender", "team:search") in recs
    assert ("top_spender", "task:lint") not in recs  # 5 % of spend


def test_non_interactive_tasks_are_batch_candidates():
    rows = [agg(requests=25, cost=400_000, task="nightly-summary", streamed=0),
            agg(requests=25, cost=400_000, task="chat", streamed=20)]
    recs = kinds(recommend(rows, EQ, CLOUD, prices))
    assert recs[("batch_api", "task:nightly-summary")].potential_saving_micros == 200_000
    assert ("batch_api", "task:chat") not in recs


def test_recommendations_are_ordered_by_saving():
    rows = [agg(requests=25, cost=400_000, task="nightly", streamed=0),
            agg("gpt-4o-mini", requests=95, cost=50_000)]
    savings = [r.potential_saving_micros for r in recommend(rows, EQ, CLOUD, prices)]
    assert savings == sorted(savings, reverse=True) and len(savings) >= 2
