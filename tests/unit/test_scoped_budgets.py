"""Scoped budgets: matching, periods, all-or-nothing reservations, alerts once, forecasts, reports."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web

from nexus_extproc.budget.alerts import AlertSender, alerts_total, deliveries
from nexus_extproc.budget.forecast import MIN_ELAPSED_S, forecast
from nexus_extproc.budget.periods import period_for
from nexus_extproc.budget.policy import Action, Target
from nexus_extproc.budget.reports import roll_up
from nexus_extproc.budget.scopes import RequestFacts, hash_api_key, matches
from nexus_extproc.budget.service import BudgetService
from nexus_extproc.config import AlertsConfig, ScopeConfig
from nexus_extproc.edge.webhook import post_json
from nexus_extproc.ledger import SpendRecord, open_ledger
from tests.conftest import make_config

SALT = b"pepper"
KEY_HASH = hash_api_key("sk-team-key", SALT)


@pytest.mark.parametrize(("scope", "facts", "want"), [
    (None, RequestFacts("gpt-4o", "cloud"), True),
    (ScopeConfig(team="ml"), RequestFacts("gpt-4o", "cloud", team="ml"), True),
    (ScopeConfig(team="ml"), RequestFacts("gpt-4o", "cloud", team="web"), False),
    (ScopeConfig(team="ml"), RequestFacts("gpt-4o", "cloud"), False),
    (ScopeConfig(team="ml", agent="bot"), RequestFacts("gpt-4o", "cloud", team="ml", agent="bot"), True),
    (ScopeConfig(team="ml", agent="bot"), RequestFacts("gpt-4o", "cloud", team="ml"), False),
    (ScopeConfig(user="ann"), RequestFacts("x", "cloud", user="ann"), True),
    (ScopeConfig(model="gpt-4o*"), RequestFacts("gpt-4o-mini", "cloud"), True),
    (ScopeConfig(model="gpt-4o*"), RequestFacts("claude-3-5-haiku", "cloud"), False),
    (ScopeConfig(backend_type="local"), RequestFacts("llama3.1:8b", "local"), True),
    (ScopeConfig(backend_type="local"), RequestFacts("gpt-4o", "cloud"), False),
    (ScopeConfig(api_key_hash=KEY_HASH), RequestFacts("gpt-4o", "cloud", api_key_hash=KEY_HASH), True),
    (ScopeConfig(api_key_hash=KEY_HASH), RequestFacts("gpt-4o", "cloud",
                                                      api_key_hash=hash_api_key("sk-other", SALT)), False),
    (ScopeConfig(api_key_hash=KEY_HASH), RequestFacts("gpt-4o", "cloud"), False),
])
def test_scope_matching(scope, facts, want):
    assert matches(scope, facts) is want


def test_api_key_hash_is_salted_and_not_the_key():
    h = hash_api_key("sk-team-key", SALT)
    assert h.startswith("hmac-sha256:") and "sk-team-key" not in h
    assert h != hash_api_key("sk-team-key", b"other-salt")


@pytest.mark.parametrize(("kind", "now", "key", "start", "end"), [
    ("daily", datetime(2026, 11, 23, 23, 59, tzinfo=UTC), "2026-11-23", datetime(2026, 11, 23, tzinfo=UTC),
     datetime(2026, 11, 24, tzinfo=UTC)),
    # ISO week: Sunday 2026-11-29 belongs to week 48 (Mon 23rd – Sun 29th); Monday starts week 49.
    ("weekly", datetime(2026, 11, 29, 23, 59, tzinfo=UTC), "2026-W48", datetime(2026, 11, 23, tzinfo=UTC),
     datetime(2026, 11, 30, tzinfo=UTC)),
    ("weekly", datetime(2026, 11, 30, 0, 0, tzinfo=UTC), "2026-W49", datetime(2026, 11, 30, tzinfo=UTC),
     datetime(2026, 12, 7, tzinfo=UTC)),
    # ISO week-year differs from the calendar year at the turn of the year.
    ("weekly", datetime(2027, 1, 1, 12, tzinfo=UTC), "2026-W53", datetime(2026, 12, 28, tzinfo=UTC),
     datetime(2027, 1, 4, tzinfo=UTC)),
    ("monthly", datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), "2026-12", datetime(2026, 12, 1, tzinfo=UTC),
     datetime(2027, 1, 1, tzinfo=UTC)),
    ("monthly", datetime(2027, 1, 1, tzinfo=UTC), "2027-01", datetime(2027, 1, 1, tzinfo=UTC),
     datetime(2027, 2, 1, tzinfo=UTC)),
])
def test_periods(kind, now, key, start, end):
    p = period_for(kind, now)
    assert (p.key, p.start, p.end) == (key, start, end)


def test_period_in_a_timezone():
    tz = ZoneInfo("America/New_York")
    p = period_for("daily", datetime(2026, 11, 24, 3, 0, tzinfo=UTC), tz)  # 22:00 on the 23rd in New York
    assert p.key == "2026-11-23" and p.start == datetime(2026, 11, 23, 5, 0, tzinfo=UTC)
    assert p.end == datetime(2026, 11, 24, 5, 0, tzinfo=UTC)


def test_forecast_matches_the_documented_formula():
    start, end = 0.0, 30 * 86400.0
    # Synthetic series: $2/day for 10 days → $20 settled at day 10.
    f = forecast(20_000_000, 100_000_000, start, end, 10 * 86400.0)
    rate = 20_000_000 / (10 * 86400.0)
    assert f.projected_micros == round(20_000_000 + rate * 20 * 86400.0) == 60_000_000
    assert f.exhaustion_in_s is None  # $100 would take 50 days at that rate: not this period
    f = forecast(20_000_000, 50_000_000, start, end, 10 * 86400.0)
    assert f.exhaustion_in_s == pytest.approx(15 * 86400.0)
    assert forecast(60_000_000, 50_000_000, start, end, 10 * 86400.0).exhaustion_in_s == 0
    early = forecast(1_000, 50_000_000, start, end, 60.0)  # one minute in: elapsed floors at an hour
    assert early.projected_micros == round(1_000 + 1_000 / MIN_ELAPSED_S * (end - 60.0))


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


def service(tmp_path, budgets, clock=None, alerts=None, **cfg):
    config = make_config(budgets=budgets, store={"kind": "sqlite", "path": str(tmp_path / "l.db")},
                         alerts=alerts or {}, **cfg)
    led = open_ledger("sqlite", path=str(tmp_path / "l.db"), timeout_ms=5000)
    return BudgetService(config, led, clock or Clock(datetime(2026, 11, 10, tzinfo=UTC)),
                         alerts=AlertSender(config.alerts, post_json))


TEAM = {"name": "team-ml", "scope": {"team": "ml"}, "limit_usd": 1, "hard_limit_action": "block_all"}
GLOBAL = {"name": "global", "limit_usd": 100}


async def test_second_budget_rejecting_leaves_no_reservation_in_the_first(tmp_path):
    svc = service(tmp_path, [GLOBAL, TEAM])
    facts = RequestFacts("gpt-4o", "cloud", team="ml")
    big = Target("openai", "cloud", "gpt-4o", 2_000_000)  # more than team-ml's $1
    adm = await svc.admit("r1", big, None, facts)
    assert adm.decision.action is Action.REJECT and adm.budget == "team-ml"
    p = svc.book.period().key
    assert (await svc.ledger.totals("global", p)).reserved == 0
    assert (await svc.ledger.totals("team-ml", p)).reserved == 0
    # The same request from another team only counts against the global budget.
    adm = await svc.admit("r2", big, None, RequestFacts("gpt-4o", "cloud", team="web"))
    assert adm.decision.action is Action.ALLOW and list(adm.items) == [("global", p)]


async def test_strictest_budget_decides_and_reserve_settle_apply_to_all(tmp_path):
    svc = service(tmp_path, [GLOBAL, {**TEAM, "hard_limit_action": "warn", "soft_limit_percent": 50}])
    facts = RequestFacts("gpt-4o-mini", "cloud", team="ml")
    adm = await svc.admit("seed", Target("openai", "cloud", "gpt-4o", 600_000), None, facts)
    await svc.settle("seed", adm, 600_000, SpendRecord(time.time(), "gpt-4o", "openai", 1, 1, 600_000, "usage"))
    eq = Target("ollama", "local", "llama3.1:8b", 0)
    adm = await svc.admit("r", Target("openai", "cloud", "gpt-4o-mini", 100), eq, facts)
    assert adm.decision.action is Action.REROUTE and adm.budget == "team-ml"
    assert adm.decision.status == "SoftLimit" and adm.view.limit_micros == 1_000_000
    p = svc.book.period().key
    assert {n for n, _ in adm.items} == {"global", "team-ml"}
    assert (await svc.ledger.totals("global", p)).settled == 600_000
    assert (await svc.ledger.totals("team-ml", p)).settled == 600_000


@pytest.mark.parametrize(("kind", "before", "after"), [
    ("daily", datetime(2026, 11, 23, 23, 59, 59, tzinfo=UTC), datetime(2026, 11, 24, tzinfo=UTC)),
    ("weekly", datetime(2026, 11, 29, 23, 59, 59, tzinfo=UTC), datetime(2026, 11, 30, tzinfo=UTC)),
    ("monthly", datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
])
async def test_rollover_per_period_kind(tmp_path, kind, before, after):
    clock = Clock(before)
    svc = service(tmp_path, [{"name": "b", "period": kind, "limit_usd": 1}], clock)
    adm = await svc.admit("r", Target("openai", "cloud", "gpt-4o", 10), None)
    await svc.settle("r", adm, 400_000, SpendRecord(time.time(), "gpt-4o", "openai", 1, 1, 10, "usage"))
    assert (await svc.book.current_view("b")).settled_micros == 400_000
    clock.t = after
    assert (await svc.book.current_view("b")).settled_micros == 0
    assert (await svc.ledger.totals("b", period_for(kind, before).key)).settled == 400_000  # history kept


class Receiver:
    """A fake webhook on 127.0.0.1 that counts what it receives (and can fail on purpose)."""

    def __init__(self, fail: bool = False) -> None:
        self.got: list[dict] = []
        self.attempts = 0
        self.fail = fail

    async def handle(self, req: web.Request) -> web.Response:
        self.attempts += 1
        if self.fail:
            return web.Response(status=500)
        self.got.append(await req.json())
        return web.Response(status=204)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}/hook"


async def test_alerts_fire_exactly_once_per_threshold_across_two_workers(tmp_path):
    rx = Receiver()
    url = await rx.start()
    budgets = [{"name": "team-ml", "scope": {"team": "ml"}, "limit_usd": 1, "alert_thresholds": [50, 80, 100]}]
    workers = [service(tmp_path, budgets, alerts={"webhook_url": url, "backoff_secs": 0.01}) for _ in range(2)]
    facts = RequestFacts("gpt-4o", "cloud", team="ml")
    before = {t: alerts_total.labels("team-ml", t)._value.get() for t in ("50", "80", "100")}

    async def one(i: int) -> None:
        w = workers[i % 2]
        adm = await w.admit(f"r{i}", Target("openai", "cloud", "gpt-4o", 25_000), None, facts)  # 50 × 2.5 %
        await w.settle(f"r{i}", adm, 25_000, SpendRecord(time.time(), "gpt-4o", "openai", 1, 1, 25_000, "usage"))

    await asyncio.gather(*(one(i) for i in range(50)))
    for _ in range(100):
        if len(rx.got) >= 4:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    # Each threshold once, plus the early warning (nine days in, the period-average rate overruns the limit).
    assert sorted(a["threshold"] for a in rx.got) == ["100", "50", "80", "forecast"]
    assert {a["budget"] for a in rx.got} == {"team-ml"} and all(a["limit_usd"] == 1.0 for a in rx.got)
    assert {t: alerts_total.labels("team-ml", t)._value.get() - before[t] for t in before} == \
        {"50": 1, "80": 1, "100": 1}
    await rx.runner.cleanup()


async def test_webhook_down_retries_then_counts_failure_without_blocking(tmp_path):
    rx = Receiver(fail=True)
    url = await rx.start()
    sender = AlertSender(AlertsConfig(webhook_url=url, max_attempts=3, backoff_secs=0.01), post_json)
    failed = deliveries.labels("failed")._value.get()
    t0 = time.perf_counter()
    sender.send({"budget": "b", "period": "p", "threshold": "80"})
    assert time.perf_counter() - t0 < 0.01  # send() never waits for the network
    await sender.drain(5)
    assert rx.attempts == 3 and deliveries.labels("failed")._value.get() == failed + 1
    await rx.runner.cleanup()


async def test_report_totals_equal_sum_of_settlements(tmp_path):
    svc = service(tmp_path, [GLOBAL, TEAM])
    costs = []
    for i in range(30):
        team = "ml" if i % 3 else "web"
        model = ["gpt-4o", "gpt-4o-mini", "claude-3-5-haiku"][i % 3]
        adm = await svc.admit(f"r{i}", Target("openai", "cloud", model, 10), None,
                              RequestFacts(model, "cloud", team=team))
        cost = 1000 + 37 * i
        costs.append((team, model, cost))
        await svc.settle(f"r{i}", adm, cost, SpendRecord(time.time() - (i % 2) * 86400, model, "openai", 5, 2,
                                                         10, "usage"))
    aggs = await svc.ledger.spend(0, time.time() + 86400)
    by_budget = {r.budget: r.cost_micros for r in roll_up(aggs, ["budget"])}
    assert by_budget["global"] == sum(c for _, _, c in costs)
    assert by_budget["team-ml"] == sum(c for t, _, c in costs if t == "ml")
    by_model = {r.model: r.cost_micros for r in roll_up([a for a in aggs if a.budget == "global"], ["model"])}
    assert by_model == {m: sum(c for _, mm, c in costs if mm == m) for m in {m for _, m, _ in costs}}
    days = roll_up(aggs, ["budget", "day"])
    assert len({r.day for r in days}) == 2 and sum(r.requests for r in days if r.budget == "global") == 30


def test_single_budget_block_is_the_global_monthly_budget():
    cfg = make_config(budget={"monthly_limit_usd": 5, "hard_limit_action": "block_all"},
                      budgets=[{"name": "team-ml", "scope": {"team": "ml"}, "period": "daily", "limit_usd": 1}])
    defs = cfg.budget_defs()
    assert [(d.name, d.period, d.limit_usd, d.hard_limit_action) for d in defs] == [
        ("global", "monthly", Decimal(5), "block_all"), ("team-ml", "daily", Decimal(1), "warn")]
    with pytest.raises(Exception, match="duplicate"):
        make_config(budget={"monthly_limit_usd": 5}, budgets=[{"name": "global", "limit_usd": 1}])
    with pytest.raises(Exception, match="timezone"):
        make_config(budgets=[{"name": "x", "limit_usd": 1, "timezone": "Mars/Olympus"}])


async def test_override_applies_to_any_budget(tmp_path):
    clock = Clock(datetime(2026, 11, 10, tzinfo=UTC))
    svc = service(tmp_path, [GLOBAL, TEAM], clock)
    from nexus_extproc.budget.service import Settings

    d = svc.admin.find("team-ml")
    assert d is not None
    await svc.admin.update_settings("team-ml", Settings(d.settings.limit_micros, d.settings.soft_limit_percent,
                                                  d.settings.hard_limit_action, 5_000_000,
                                                  (clock.t + timedelta(hours=1)).timestamp()), "ops")
    assert (await svc.book.current_view("team-ml")).limit_micros == 5_000_000
    clock.t += timedelta(hours=2)
    assert (await svc.book.current_view("team-ml")).limit_micros == 1_000_000
    assert [a.field for a in await svc.ledger.audit_log(10)] == ["override_until", "override_limit_micros"]
