"""Roll-ups by day/week/month, backend, task and tag, and the FOCUS 1.2 export, on constructed aggregates."""

from __future__ import annotations

import csv
import io
import json

import pytest

from nexus_extproc.budget.focus import COLUMNS, PriceInfo, focus_rows, split_cost, to_focus_csv
from nexus_extproc.budget.reports import roll_up
from nexus_extproc.ledger import SpendAgg
from nexus_extproc.request.attribution import BadAttribution, parse_tags, parse_task


def agg(day: str, cost: int, **kw: object) -> SpendAgg:
    base: dict[str, object] = {"budget": "global", "model": "gpt-4o", "day": day, "requests": 1,
                               "input_tokens": 1000, "output_tokens": 100, "cost": cost, "estimate": cost * 2}
    base.update(kw)
    return SpendAgg(**base)  # type: ignore[arg-type]


AGGS = [agg("2026-11-30", 100, task="triage", tags="env=prod,team-a"),
        agg("2026-12-01", 200, task="triage", tags="env=prod"),
        agg("2026-12-06", 400, task="nightly", tags="", backend="ollama", model="llama3.2"),
        agg("2026-12-07", 800, task="", tags="team-a")]


def test_weekly_and_monthly_roll_ups_partition_the_total():
    weeks = {r.week: r.cost_micros for r in roll_up(AGGS, ["week"])}
    assert weeks == {"2026-W49": 700, "2026-W50": 800}  # 2026-11-30 is the Monday of ISO week 49
    months = {r.month: r.cost_micros for r in roll_up(AGGS, ["month"])}
    assert months == {"2026-11": 100, "2026-12": 1400}
    assert sum(r.cost_micros for r in roll_up(AGGS, ["task", "backend"])) == 1500


def test_tag_rows_split_a_settlements_tags_and_overlap():
    tags = {r.tag: r.cost_micros for r in roll_up(AGGS, ["tag"])}
    assert tags == {"env=prod": 300, "team-a": 900, "": 400}
    assert {r.task: r.requests for r in roll_up(AGGS, ["task"])} == {"": 1, "nightly": 1, "triage": 2}


def test_unknown_grouping_is_refused():
    with pytest.raises(ValueError):
        roll_up(AGGS, ["colour"])


@pytest.mark.parametrize("total,weights", [(7, [1, 1, 1]), (100, [0, 0]), (1_000_001, [3, 250, 10]), (0, [5, 1])])
def test_split_cost_sums_exactly(total, weights):
    parts = split_cost(total, weights)
    assert sum(parts) == total and len(parts) == len(weights) and min(parts) >= 0


def _prices(backend: str, model: str) -> PriceInfo:
    if backend == "ollama":
        return PriceInfo("Self-hosted", "ollama", {"input": 0, "cache_read": 0, "output": 0})
    return PriceInfo("OpenAI", "OpenAI API", {"input": 2_500_000, "cache_read": 1_250_000, "output": 10_000_000})


def test_focus_rows_one_per_token_type_and_costs_add_up():
    aggs = [agg("2026-12-01", 3_000, backend="openai", cache_read_tokens=400, team="search", task="triage",
                tags="env=prod,team-a"),
            agg("2026-12-01", 1_234, backend="openai", team="search", task="triage", tags="env=prod,team-a"),
            agg("2026-12-02", 9, backend="ollama", model="llama3.2")]
    rows = focus_rows(aggs, _prices)
    openai = [r for r in rows if r["ProviderName"] == "OpenAI"]
    # the two aggregates share key, model and day: one row per token type
    assert [r["x_TokenType"] for r in openai] == ["input", "cache_read", "output"]
    assert [r["ConsumedQuantity"] for r in openai] == ["1600", "400", "200"]
    billed = sum(round(float(r["BilledCost"]) * 1e6) for r in openai)
    assert billed == 4_234
    # list cost per token type: 1600 × 2.5 $/M, 400 × 1.25 $/M, 200 × 10 $/M
    assert [r["ListCost"] for r in openai] == ["0.004000", "0.000500", "0.002000"]
    r0 = openai[0]
    assert r0["ChargePeriodStart"] == "2026-12-01T00:00:00Z" and r0["ChargePeriodEnd"] == "2026-12-02T00:00:00Z"
    assert r0["BillingPeriodStart"] == "2026-12-01T00:00:00Z" and r0["BillingPeriodEnd"] == "2027-01-01T00:00:00Z"
    assert r0["SubAccountId"] == "search" and r0["ResourceId"] == "gpt-4o"
    assert json.loads(r0["Tags"]) == {"env": "prod", "team-a": "", "x_nexus_task": "triage"}
    assert json.loads(r0["SkuPriceDetails"]) == {"TokenType": "input"}
    assert (r0["ChargeCategory"], r0["ConsumedUnit"], r0["ServiceCategory"], r0["BillingCurrency"]) == (
        "Usage", "Tokens", "AI and Machine Learning", "USD")
    local = [r for r in rows if r["ProviderName"] == "Self-hosted"]
    assert sum(round(float(r["BilledCost"]) * 1e6) for r in local) == 9  # no list price: all on the first row


def test_focus_csv_has_the_required_columns():
    text = to_focus_csv(focus_rows([agg("2026-12-01", 50, backend="openai")], _prices))
    header = next(csv.reader(io.StringIO(text)))
    assert tuple(header) == COLUMNS
    required = {"BilledCost", "EffectiveCost", "ListCost", "BillingCurrency", "ChargeCategory", "ChargePeriodStart",
                "ChargePeriodEnd", "BillingPeriodStart", "BillingPeriodEnd", "ConsumedQuantity", "ConsumedUnit",
                "PricingUnit", "ListUnitPrice", "SkuId", "SkuPriceDetails", "ServiceCategory", "ServiceName",
                "ProviderName", "PublisherName", "ResourceId", "SubAccountId", "Tags"}
    assert required <= set(header)
    assert all(c in required or c.startswith("x_") or c in COLUMNS for c in header)


@pytest.mark.parametrize("raw,want", [(None, ""), ("  ", ""), ("triage-v2", "triage-v2"), ("a/b:c@d", "a/b:c@d")])
def test_task_header_accepted(raw, want):
    assert parse_task(raw) == want


@pytest.mark.parametrize("raw", ["x" * 65, "has space", "-lead", "émoji", "a,b"])
def test_task_header_refused(raw):
    with pytest.raises(BadAttribution) as e:
        parse_task(raw)
    assert raw not in str(e.value)  # the refusal never echoes the value


def test_tags_normalised_and_bounded():
    assert parse_tags(" b , a,b ,env=prod") == "a,b,env=prod"
    with pytest.raises(BadAttribution):
        parse_tags(",".join(f"t{i}" for i in range(9)))
    with pytest.raises(BadAttribution):
        parse_tags("ok,bad tag")


def test_focus_tags_carry_the_client_tool():
    rows = focus_rows([agg("2026-12-01", 50, backend="openai", task="fix", tool="claude-code"),
                       agg("2026-12-01", 20, backend="openai", task="fix", tool="codex"),
                       agg("2026-12-01", 5, backend="openai", task="fix", tool="other")], _prices)
    tags = sorted((json.loads(r["Tags"]) for r in rows if r["x_TokenType"] == "input"),
                  key=lambda t: t.get("x_nexus_tool", ""))
    assert tags == [{"x_nexus_task": "fix"}, {"x_nexus_task": "fix", "x_nexus_tool": "claude-code"},
                    {"x_nexus_task": "fix", "x_nexus_tool": "codex"}]
