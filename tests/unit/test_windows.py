"""Short and rolling windows (issue 28 item 1): their periods, the store's window sums through admission, the
429 with a wait a client can sleep through, and alerts once per window."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from nexus_extproc.apis.errors import budget_exceeded
from nexus_extproc.budget.periods import PeriodRule, period_for, seconds_until_room
from nexus_extproc.budget.policy import Action, Target
from nexus_extproc.config import BudgetDefConfig
from nexus_extproc.ledger import SpendRecord
from tests.unit.test_scoped_budgets import Clock, service

T0 = datetime(2026, 11, 10, 12, 0, 0, tzinfo=UTC)


def test_rolling_period_is_the_current_bucket_of_a_twelve_bucket_window():
    p = period_for(PeriodRule.of({"rolling": "1h"}), T0 + timedelta(minutes=7, seconds=30))
    # 5-minute buckets: 12:05-12:10 is the current one; the window it closes began at 11:10.
    assert p.end == T0 + timedelta(minutes=10) and p.start == p.end - timedelta(hours=1)
    assert p.key == f"R300x12:{int(p.end.timestamp()) // 300 - 1:012d}"
    later = period_for(PeriodRule.of({"rolling": "1h"}), T0 + timedelta(minutes=10))
    assert later.key > p.key and later.alert_key == p.alert_key  # one alert block per hour-aligned window


@pytest.mark.parametrize(("value", "at", "key", "length"), [
    ("hourly", T0 + timedelta(minutes=59), "2026-11-10T12:00Z", timedelta(hours=1)),
    ({"every": "10m"}, T0 + timedelta(minutes=19), f"E600:{int((T0 + timedelta(minutes=10)).timestamp()) // 600:012d}",
     timedelta(minutes=10)),
])
def test_short_fixed_windows(value, at, key, length):
    p = period_for(value, at)
    assert p.key == key and p.end - p.start == length and p.start <= at < p.end
    assert PeriodRule.of(value).short


def test_hourly_follows_the_zone_hour():
    """India is UTC+05:30: its hours start at half past in UTC."""
    p = period_for("hourly", datetime(2026, 11, 10, 12, 40, tzinfo=UTC), ZoneInfo("Asia/Kolkata"))
    assert p.start == datetime(2026, 11, 10, 12, 30, tzinfo=UTC) and p.key == "2026-11-10T12:30Z"


@pytest.mark.parametrize("bad", [{"rolling": "90s"}, {"rolling": "30s"}, {"rolling": "0m"}, {"rolling": "32d"},
                                 {"every": "2d"}, {"every": "90s"}, {"rolling": "1h", "every": "1h"}, "yearly"])
def test_bad_windows_are_refused_at_start_up(bad):
    with pytest.raises(ValidationError):
        BudgetDefConfig(name="b", limit_usd=1, period=bad)


def test_seconds_until_room_walks_the_oldest_buckets():
    rule = PeriodRule.of({"rolling": "1h"})
    p = period_for(rule, T0 + timedelta(minutes=2))  # current bucket ends at 12:05
    buckets = [(0, 0)] * 12
    buckets[0], buckets[3] = (100, 0), (300, 50)
    now = T0 + timedelta(minutes=2)
    assert seconds_until_room(rule, p, buckets, 100, now) == 180  # bucket 0 leaves at 12:05
    assert seconds_until_room(rule, p, buckets, 101, now) == 180 + 3 * 300  # bucket 3 at 12:20
    assert seconds_until_room(rule, p, buckets, 10_000, now) == 180 + 11 * 300  # never within the window


def test_a_short_window_refusal_is_a_429_a_client_can_wait_out():
    e = budget_exceeded("budget_exhausted", "agents", 42, "2026-11-10T12:00:42Z", 60, short=True)
    assert e.status == 429 and e.headers["retry-after"] == "42" and "x-should-retry" not in e.headers
    far = budget_exceeded("budget_exhausted", "agents", 3_000, "2026-11-10T12:50:00Z", 60, short=True)
    assert far.status == 429 and "retry-after" not in far.headers and far.headers["x-should-retry"] == "false"
    assert budget_exceeded("budget_exhausted", None, 42, "x", 60).status == 503  # the calendar budgets' 503


async def test_rolling_budget_refuses_with_the_wait_until_spend_ages_out_then_admits(tmp_path):
    clock = Clock(T0 + timedelta(minutes=1))
    svc = service(tmp_path, [{"name": "burst", "period": {"rolling": "15m"}, "limit_usd": 1,
                              "hard_limit_action": "block_all"}], clock)
    rec = SpendRecord(time.time(), "gpt-4o", "openai", 1, 1, 0, "usage")
    # 12:01: $0.60 settles; 12:04: $0.30 more (75 s buckets: 12:00:00, 12:03:45).
    adm = await svc.admit("a", Target("openai", "cloud", "gpt-4o", 600_000), None)
    await svc.settle("a", adm, 600_000, rec)
    clock.t = T0 + timedelta(minutes=4)
    adm = await svc.admit("b", Target("openai", "cloud", "gpt-4o", 300_000), None)
    await svc.settle("b", adm, 300_000, rec)
    # 12:05: $0.20 does not fit ($0.90 in the last 15 minutes); room comes when 12:00's bucket leaves the
    # window, at 12:15:00.
    clock.t = T0 + timedelta(minutes=5)
    adm = await svc.admit("c", Target("openai", "cloud", "gpt-4o", 200_000), None)
    assert adm.decision.action is Action.REJECT and adm.short
    assert adm.reset_in_s == 10 * 60
    assert (await svc.book.current_view("burst")).settled_micros == 900_000
    # 12:15:00: the first $0.60 has aged out, the request fits.
    clock.t = T0 + timedelta(minutes=15)
    assert (await svc.book.current_view("burst")).settled_micros == 300_000
    adm = await svc.admit("d", Target("openai", "cloud", "gpt-4o", 200_000), None)
    assert adm.decision.action is Action.ALLOW
    # A calendar budget's refusal stays a 503 (not short).
    svc2 = service(tmp_path / "cal", [{"name": "m", "limit_usd": 1, "hard_limit_action": "block_all"}], clock)
    adm = await svc2.admit("e", Target("openai", "cloud", "gpt-4o", 2_000_000), None)
    assert adm.decision.action is Action.REJECT and not adm.short


async def test_every_window_resets_at_its_boundary(tmp_path):
    clock = Clock(T0 + timedelta(minutes=9, seconds=30))
    svc = service(tmp_path, [{"name": "ten", "period": {"every": "10m"}, "limit_usd": 1,
                              "hard_limit_action": "block_all"}], clock)
    adm = await svc.admit("a", Target("openai", "cloud", "gpt-4o", 900_000), None)
    await svc.settle("a", adm, 900_000, SpendRecord(time.time(), "gpt-4o", "openai", 1, 1, 0, "usage"))
    adm = await svc.admit("b", Target("openai", "cloud", "gpt-4o", 200_000), None)
    assert adm.decision.action is Action.REJECT and adm.short and adm.reset_in_s == 30
    clock.t = T0 + timedelta(minutes=10)
    assert (await svc.admit("c", Target("openai", "cloud", "gpt-4o", 200_000), None)).decision.action is Action.ALLOW
