"""A FOCUS 1.2 cost-and-usage export of the ledger's settlements, for FinOps tools.

One row per (team, task, tags) key × model × token type × UTC day, each settlement counted once (not once per
budget). Token types are `input` (prompt tokens not read from the cache), `cache_read` and `output`. The
provider's bill is per request, not per token type, so a row's BilledCost is the day's actual cost split over
its token types in proportion to their list cost (largest remainder on integer micro-dollars: the rows of a
key, model and day sum exactly to what the ledger settled). Deviations from FOCUS 1.2 are listed in
docs/budgets.md ("FOCUS export").
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from nexus_extproc.ledger import SpendAgg

TOKEN_TYPES = ("input", "cache_read", "output")


@dataclass(frozen=True, slots=True)
class PriceInfo:
    """What the export needs of a model on a backend: who provides it and its list prices per 1M tokens."""

    provider: str  # ProviderName, e.g. "OpenAI"; "Self-hosted" for local backends
    service: str  # ServiceName
    per_mtok_micros: dict[str, int]  # token type -> micro-dollars per 1M tokens


PriceOf = Callable[[str, str], PriceInfo]  # (backend, model) -> PriceInfo

COLUMNS = (
    "BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "BillingCurrency", "BillingAccountId",
    "BillingPeriodStart", "BillingPeriodEnd", "ChargeCategory", "ChargeClass", "ChargeDescription",
    "ChargeFrequency", "ChargePeriodStart", "ChargePeriodEnd", "ConsumedQuantity", "ConsumedUnit",
    "PricingCategory", "PricingQuantity", "PricingUnit", "ListUnitPrice", "ContractedUnitPrice", "SkuId",
    "SkuPriceId", "SkuPriceDetails", "ServiceCategory", "ServiceName", "ProviderName", "PublisherName",
    "InvoiceIssuerName", "ResourceId", "ResourceName", "ResourceType", "SubAccountId", "SubAccountName", "Tags",
    "x_Task", "x_Backend", "x_ModelRequested", "x_Requests", "x_AvoidedCost", "x_EstimatedCost", "x_TokenType",
)


def _iso(d: date) -> str:
    return datetime(d.year, d.month, d.day, tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _usd(micros: int) -> str:
    return f"{micros / 1e6:.6f}"


def _tags(task: str, tags: str, tool: str = "") -> str:
    """KeyValueFormat: `k=v` tags as keys and values, a bare tag as a key with an empty value; the task and the
    client tool too (claude-code, codex, ...; its sessions stay in the ledger's reports, not here)."""
    out: dict[str, str] = {}
    for t in tags.split(",") if tags else []:
        k, _, v = t.partition("=")
        out[k] = v
    if task:
        out["x_nexus_task"] = task
    if tool and tool != "other":  # "other": no tool recognised, nothing to tag
        out["x_nexus_tool"] = tool
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def split_cost(total: int, weights: list[int]) -> list[int]:
    """`total` over `weights`, integers summing exactly to `total` (largest remainder). All on the first
    weight when every weight is zero (a model with no list price still has its cost on a row)."""
    s = sum(weights)
    if s <= 0:
        return [total] + [0] * (len(weights) - 1)
    shares = [total * w // s for w in weights]
    rest = total - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (total * weights[i]) % s, reverse=True)
    for i in order[:rest]:
        shares[i] += 1
    return shares


def focus_rows(aggs: Iterable[SpendAgg], price_of: PriceOf, billing_account: str = "nexus-extproc"
               ) -> list[dict[str, str]]:
    """`aggs` from `ledger.spend(..., per_budget=False)`."""
    merged: dict[tuple[str, ...], list[int]] = {}
    for a in aggs:
        k = (a.day, a.team, a.task, a.tags, a.backend, a.model, a.model_requested, a.tool)
        m = merged.setdefault(k, [0] * 7)
        for i, v in enumerate((a.requests, a.input_tokens, a.cache_read_tokens, a.output_tokens, a.cost,
                               a.avoided, a.estimate)):
            m[i] += v
    rows: list[dict[str, str]] = []
    for (day_s, team, task, tags, backend, model, asked, tool), (n, inp, cread, out, cost, avoided, est) in sorted(
            merged.items()):
        info = price_of(backend, model)
        day = date.fromisoformat(day_s)
        month = day.replace(day=1)
        next_month = (month + timedelta(days=32)).replace(day=1)
        qty = {"input": max(inp - cread, 0), "cache_read": cread, "output": out}
        present = [t for t in TOKEN_TYPES if qty[t] or (t == "input" and not any(qty.values()))]
        lists = [qty[t] * info.per_mtok_micros.get(t, 0) // 1_000_000 for t in present]
        billed = split_cost(cost, [qty[t] * info.per_mtok_micros.get(t, 0) for t in present])
        by_tokens = [qty[t] for t in present]
        avoided_s, est_s = split_cost(avoided, by_tokens), split_cost(est, by_tokens)
        for i, t in enumerate(present):
            sku = f"{info.provider.lower().replace(' ', '-')}/{model}/{t}"
            unit = _usd(info.per_mtok_micros.get(t, 0))  # USD per 1M tokens
            rows.append({
                "BilledCost": _usd(billed[i]), "EffectiveCost": _usd(billed[i]), "ListCost": _usd(lists[i]),
                "ContractedCost": _usd(billed[i]), "BillingCurrency": "USD", "BillingAccountId": billing_account,
                "BillingPeriodStart": _iso(month), "BillingPeriodEnd": _iso(next_month),
                "ChargeCategory": "Usage", "ChargeClass": "",
                "ChargeDescription": f"{model} {t.replace('_', ' ')} tokens",
                "ChargeFrequency": "Usage-Based", "ChargePeriodStart": _iso(day),
                "ChargePeriodEnd": _iso(day + timedelta(days=1)), "ConsumedQuantity": str(qty[t]),
                "ConsumedUnit": "Tokens", "PricingCategory": "Standard",
                "PricingQuantity": f"{qty[t] / 1e6:.6f}", "PricingUnit": "1M Tokens", "ListUnitPrice": unit,
                "ContractedUnitPrice": unit, "SkuId": sku, "SkuPriceId": sku,
                "SkuPriceDetails": json.dumps({"TokenType": t}, separators=(",", ":")),
                "ServiceCategory": "AI and Machine Learning", "ServiceName": info.service,
                "ProviderName": info.provider, "PublisherName": info.provider, "InvoiceIssuerName": info.provider,
                "ResourceId": model, "ResourceName": model, "ResourceType": "Model", "SubAccountId": team,
                "SubAccountName": team, "Tags": _tags(task, tags, tool), "x_Task": task, "x_Backend": backend,
                "x_ModelRequested": asked, "x_Requests": str(n if i == 0 else 0),
                "x_AvoidedCost": _usd(avoided_s[i]), "x_EstimatedCost": _usd(est_s[i]), "x_TokenType": t,
            })
    return rows


def to_focus_csv(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
