"""Cost recommendations computed from settlements: each names its rule, its subject, the potential saving in
USD (integer micro-dollars) and the figures behind it. Pure: aggregates, the configured equivalents and a
price lookup in, recommendations out (docs/budgets.md "Recommendations" gives each rule's thresholds).

Rules:
- use_local_equivalent: a cloud model with a configured local equivalent that served few of its requests
  (< 10 % rerouted): the saving is what its cloud requests cost minus what the local model would have.
- prompt_caching: a model sent long prompts (≥ 2,000 input tokens a request on average, the mark of re-sent
  conversations and agent loops) with a low cache-hit share (< 20 %), whose price makes cache reads cheaper: the
  saving is half of its input tokens moving to the cache-read price.
- reservation_too_high: a model whose observed output is below a quarter of the output reserved (max_tokens):
  budgets then refuse early. The figure is the budget held back by the over-reservation (estimate − cost), not
  a spend saving; it is reported separately (`saving_kind: "headroom"`).
- top_spender: the priciest agents, tasks and teams (up to 3 each, ≥ 10 % of spend): their spend on models with a local
  equivalent is what rerouting them could save.
- batch_api: a task whose requests were all non-streamed (≥ 20 of them) on a cloud backend: OpenAI's and
  Anthropic's batch APIs charge half, so half its cost.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nexus_extproc.ledger import SpendAgg

# (backend, model) -> micro-dollars per 1M tokens by token type ("input", "cache_read", "output")
ListPrices = Callable[[str, str], dict[str, int]]

MIN_REQUESTS = 20
LOW_REROUTE_SHARE = 0.10
LONG_PROMPT_TOKENS = 2_000
LOW_CACHE_SHARE = 0.20
LOW_OUTPUT_SHARE = 0.25
TOP_SHARE = 0.10
BATCH_DISCOUNT = 0.5


@dataclass(frozen=True, slots=True)
class Recommendation:
    kind: str
    subject: str
    summary: str
    potential_saving_micros: int
    data: dict[str, object]

    def doc(self) -> dict[str, object]:
        return {"kind": self.kind, "subject": self.subject, "summary": self.summary,
                "potential_saving_usd": self.potential_saving_micros / 1e6, "data": self.data}

    def data_json(self) -> str:
        return json.dumps(self.data, sort_keys=True)


def _usd(m: int) -> str:
    return f"${m / 1e6:,.2f}" if m >= 1_000_000 or m == 0 else f"${m / 1e6:.4f}"


def recommend(aggs: Iterable[SpendAgg], equivalents: dict[str, str], cloud_backends: set[str],
              prices: ListPrices) -> list[Recommendation]:
    """`aggs`: settlements once each (ledger.spend(..., per_budget=False)); `equivalents`: cloud model ->
    "backend/model"; `cloud_backends`: the backends of type cloud."""
    rows = list(aggs)
    total = sum(a.cost for a in rows) or 1
    out: list[Recommendation] = []
    out += _local_equivalents(rows, equivalents, cloud_backends, prices)
    out += _prompt_caching(rows, cloud_backends, prices)
    out += _reservations(rows)
    out += _top_spenders(rows, equivalents, total)
    out += _batch(rows, cloud_backends)
    return sorted(out, key=lambda r: (-r.potential_saving_micros, r.kind, r.subject))


def _local_equivalents(rows: list[SpendAgg], equivalents: dict[str, str], cloud: set[str],
                       prices: ListPrices) -> list[Recommendation]:
    out = []
    for model, target in sorted(equivalents.items()):
        on_cloud = [a for a in rows if a.model == model and a.backend in cloud]
        rerouted = sum(a.requests for a in rows if a.model_requested == model and a.model != model)
        n = sum(a.requests for a in on_cloud)
        if n + rerouted < MIN_REQUESTS or rerouted / (n + rerouted) >= LOW_REROUTE_SHARE:
            continue
        cost = sum(a.cost for a in on_cloud)
        backend, _, local_model = target.partition("/")
        lp = prices(backend, local_model)
        local = sum((a.input_tokens * lp.get("input", 0) + a.output_tokens * lp.get("output", 0)) // 1_000_000
                    for a in on_cloud)
        saving = max(0, cost - local)
        if saving <= 0:
            continue
        out.append(Recommendation(
            "use_local_equivalent", model,
            f"{model}: {n} requests on the cloud cost {_usd(cost)}; its local equivalent {target} served "
            f"{rerouted} ({100 * rerouted / (n + rerouted):.0f} %). Routing more of them there (a lower soft "
            f"limit, or the equivalent as the default) could save up to {_usd(saving)}.",
            saving, {"cloud_requests": n, "rerouted_requests": rerouted, "cloud_cost_usd": cost / 1e6,
                     "local_cost_usd": local / 1e6, "equivalent": target}))
    return out


def _prompt_caching(rows: list[SpendAgg], cloud: set[str], prices: ListPrices) -> list[Recommendation]:
    # Per model and task: one agent loop re-sending long conversations should not be averaged away by a job
    # with short prompts on the same model.
    by: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for a in rows:
        if a.backend in cloud:
            m = by[(a.backend, a.model, a.task)]
            m[0] += a.requests
            m[1] += a.input_tokens
            m[2] += a.cache_read_tokens
    out = []
    for (backend, model, task), (n, inp, cached) in sorted(by.items()):
        if n < MIN_REQUESTS or inp / n < LONG_PROMPT_TOKENS or cached / max(inp, 1) >= LOW_CACHE_SHARE:
            continue
        p = prices(backend, model)
        per_token_gain = p.get("input", 0) - p.get("cache_read", p.get("input", 0))
        saving = int((inp // 2 - cached) * per_token_gain // 1_000_000) if inp // 2 > cached else 0
        if saving <= 0:
            continue
        subject = f"{model} (task {task})" if task else model
        out.append(Recommendation(
            "prompt_caching", subject,
            f"{subject}: {n} requests averaging {inp // n:,} input tokens with {100 * cached / inp:.0f} % read from "
            f"the provider's cache. Stable prompt prefixes (system prompt and tools first, cache_control on "
            f"Anthropic) reaching half cached would save about {_usd(saving)}.",
            saving, {"requests": n, "input_tokens": inp, "cache_read_tokens": cached,
                     "cache_hit_share": round(cached / inp, 4), "backend": backend, "task": task}))
    return out


def _reservations(rows: list[SpendAgg]) -> list[Recommendation]:
    by: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for a in rows:
        m = by[a.model]
        m[0] += a.requests
        m[1] += a.output_tokens
        m[2] += a.output_reserved
        m[3] += a.estimate
        m[4] += a.cost
    out = []
    for model, (n, produced, reserved, est, cost) in sorted(by.items()):
        if n < MIN_REQUESTS or reserved <= 0 or produced / reserved >= LOW_OUTPUT_SHARE:
            continue
        held = max(0, est - cost)
        out.append(Recommendation(
            "reservation_too_high", model,
            f"{model}: requests reserved {reserved // n:,} output tokens on average and produced {produced // n:,} "
            f"({100 * produced / reserved:.0f} %). A lower max_tokens lets budgets admit more before refusing: "
            f"{_usd(held)} of budget was held back by over-reservation.",
            held, {"requests": n, "output_tokens": produced, "output_reserved": reserved,
                   "estimate_usd": est / 1e6, "cost_usd": cost / 1e6, "saving_kind": "headroom"}))
    return out


def _top_spenders(rows: list[SpendAgg], equivalents: dict[str, str], total: int) -> list[Recommendation]:
    out = []
    for dim in ("agent", "task", "team"):
        by: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for a in rows:
            key = getattr(a, dim)
            if key:
                m = by[key]
                m[0] += a.requests
                m[1] += a.cost
                m[2] += a.cost if a.model in equivalents else 0
        top = sorted(by.items(), key=lambda kv: -kv[1][1])[:3]
        for key, (n, cost, movable) in top:
            if cost / total < TOP_SHARE:
                continue
            out.append(Recommendation(
                "top_spender", f"{dim}:{key}",
                f"{dim} {key}: {_usd(cost)} over {n} requests, {100 * cost / total:.0f} % of all spend; "
                f"{_usd(movable)} of it on models with a local equivalent.",
                movable, {"dimension": dim, "requests": n, "cost_usd": cost / 1e6,
                          "share": round(cost / total, 4), "on_models_with_equivalent_usd": movable / 1e6}))
    return out


def _batch(rows: list[SpendAgg], cloud: set[str]) -> list[Recommendation]:
    by: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for a in rows:
        if a.task and a.backend in cloud:
            m = by[a.task]
            m[0] += a.requests
            m[1] += a.streamed
            m[2] += a.cost
    out = []
    for task, (n, streamed, cost) in sorted(by.items()):
        if n < MIN_REQUESTS or streamed:
            continue
        saving = int(cost * BATCH_DISCOUNT)
        out.append(Recommendation(
            "batch_api", f"task:{task}",
            f"task {task}: {n} requests, none streamed, {_usd(cost)} on cloud models. If it does not need answers "
            f"within seconds, the providers' batch APIs (half price, results within 24 h) would save "
            f"{_usd(saving)}.",
            saving, {"requests": n, "cost_usd": cost / 1e6, "discount": BATCH_DISCOUNT}))
    return out
