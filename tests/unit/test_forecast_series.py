"""The series forecast (budget/forecast.py): a known answer, the trend label, interval coverage on draws from
a known process, and the projection of a budget from its settlements, which fires the forecast alert once."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta

import pytest

from bench.forecast import SCENARIOS, run
from nexus_extproc.budget.forecast import rest_of_period, series_forecast
from nexus_extproc.budget.service import BudgetService
from nexus_extproc.ledger import SpendRecord, open_ledger
from tests.conftest import make_config

WEEK = [1.2, 1.2, 1.2, 1.2, 1.2, 0.5, 0.5]


def test_a_noiseless_weekly_series_is_projected_exactly():
    # level 1,000 + 20/day, weekday pattern; history starts on a Monday
    series = [round((1000 + 20 * t) * WEEK[t % 7]) for t in range(28)]
    fc = series_forecast(series, 0)
    want7 = sum((1000 + 20 * (28 + k + 0.5)) * WEEK[k % 7] for k in range(7))
    p7 = fc.horizons[0]
    assert p7.days == 7 and abs(p7.point_micros - want7) / want7 < 0.01
    assert fc.trend == "increasing" and p7.high_micros - p7.low_micros < 0.02 * want7
    assert abs(fc.seasonal[0] / fc.seasonal[6] - 1.2 / 0.5) < 0.1  # weekday vs Sunday, from the data


@pytest.mark.parametrize("growth,want", [(0.0, "stable"), (0.02, "increasing"), (-0.01, "decreasing")])
def test_trend_label(growth, want):
    rng = random.Random(7)
    series = [max(0, round(1_000_000 * (1 + growth * t) * (1 + 0.08 * rng.gauss(0, 1)))) for t in range(42)]
    assert series_forecast(series, 3).trend == want


def test_intervals_cover_about_80_percent_of_known_outcomes():
    res = run(150)
    for name, r in res.items():
        for h, cov in r["coverage_80"].items():  # type: ignore[attr-defined]
            assert 0.65 <= cov <= 0.92, (name, h, cov)
        assert r["trend_label_correct"] >= 0.85, name
    assert set(res) == set(SCENARIOS)


def test_no_history_projects_nothing_and_fractions_of_days_count():
    assert series_forecast([], 0).horizons[0].point_micros == 0
    flat = [1000] * 21
    assert rest_of_period(flat, 0, 0.5, 2.5).point_micros == 2500


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


async def test_budget_projection_from_settlements_and_the_forecast_alert_fires_once(tmp_path):
    path = str(tmp_path / "l.db")
    cfg = make_config(budgets=[{"name": "global", "limit_usd": 100, "alert_thresholds": [90]}],
                      store={"kind": "sqlite", "path": path, "outbox_path": str(tmp_path / "o.jsonl")})
    now = datetime.now(UTC).replace(microsecond=0)
    sent: list[dict[str, object]] = []
    svc = BudgetService(cfg, open_ledger("sqlite", path=path), Clock(now))
    svc.alerts.send = sent.append  # type: ignore[method-assign]
    # 20 days of $6/day, all counted in this period's totals: $120 settled, over the $100 limit already.
    period = svc.book.defs[0].period(now)
    for i in range(20, 0, -1):
        ts = (now - timedelta(days=i)).timestamp()
        await svc.ledger.reserve(f"r{i}", [("global", period.key)], 0, time.time() + 60)
        await svc.ledger.settle(f"r{i}", [("global", period.key)], 6_000_000,
                                SpendRecord(ts, "gpt-4o", "openai", 1, 1, 6_000_000, "usage"))
    p = await svc.admin.insights.forecast(svc.book.defs[0])
    assert p.series.history_days == 20 and p.series.trend == "stable"
    assert [round(h.point_micros / 1e6) for h in p.series.horizons] == [42, 180, 540]
    assert p.end_of_period.point_micros > p.settled_micros
    days_left = (period.end - now).total_seconds() / 86400
    assert abs(p.end_of_period.point_micros - (120_000_000 + 6_000_000 * days_left)) < 100_000
    assert p.overrun_likely  # $120 settled already
    doc = p.doc()
    assert doc["trend"] == "stable" and len(doc["horizons"]) == 3 and doc["interval"] == 0.8  # type: ignore[arg-type]
    await svc.reconcile_once()
    await svc.reconcile_once()
    for _ in range(100):  # the claim and the send run in a background task
        if sent:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # and a second one, were there one
    assert [a["threshold"] for a in sent].count("forecast") == 1
    await svc.ledger.close()
