"""Runaway detection on constructed agent loops (issue 28 item 5): a steady agent stays quiet, one that suddenly
spends 20x its baseline is caught within one short window, a newcomer far above its peers is caught too, and
a finding alerts once and throttles or blocks the value everywhere."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from decimal import Decimal

from nexus_extproc.budget.policy import REJECT_RUNAWAY, Action, Target
from nexus_extproc.budget.runaway import Detector
from nexus_extproc.budget.scopes import RequestFacts
from nexus_extproc.config import RunawayConfig
from nexus_extproc.ledger import SpendRecord
from tests.unit.test_scoped_budgets import Clock, Receiver, service

CFG = RunawayConfig(enabled=True, window="5m", baseline="1h", factor=Decimal(10), min_spend_usd=Decimal("0.50"))
T0 = 1_795_000_000.0 - 1_795_000_000.0 % 3600  # an hour boundary


def agent(name: str) -> RequestFacts:
    return RequestFacts("claude-sonnet-4-5", "cloud", agent=name, session=f"s-{name}")


def run(det: Detector, facts: RequestFacts, start: float, end: float, every_s: float, micros: int) -> list:
    found, t = [], start
    while t < end:
        found += det.observe(facts, micros, t)
        t += every_s
    return found


def test_a_steady_agent_stays_quiet_for_hours():
    det = Detector(CFG)
    # $0.02 every 10 s: $0.60 per 5 minutes, above the floor, for 3 hours.
    assert run(det, agent("steady"), T0, T0 + 3 * 3600, 10, 20_000) == []


def test_an_agent_at_20x_its_baseline_is_caught_within_one_window():
    det = Detector(CFG)
    a = agent("loop")
    assert run(det, a, T0, T0 + 3600, 10, 2_000) == []  # an hour at $0.06 per window
    # Then a retry loop: 20x, $0.04 every 10 s.
    start = T0 + 3600
    found = []
    t = start
    while not found and t < start + 3600:
        found = det.observe(a, 40_000, t)
        t += 10
    assert found, "not caught within an hour"
    caught_after = t - 10 - start
    assert caught_after <= 300, caught_after  # within one short window
    by_dim = {f.dim: f for f in found}
    assert set(by_dim) == {"session", "agent"}  # both of its values (no key in these facts)
    f = by_dim["agent"]
    assert f.value == "loop" and f.window_micros >= 10 * f.baseline_micros and f.baseline_micros == 60_000
    # Once per episode: the loop going on does not alert again in this window or the next.
    assert run(det, a, t, t + 300, 10, 40_000) == []


def test_a_newcomer_far_above_its_peers_is_caught():
    det = Detector(CFG)
    peers = [agent(f"p{i}") for i in range(5)]
    t = T0
    while t < T0 + 600:
        for p in peers:
            assert det.observe(p, 5_000, t) == []  # $0.15 per window each
        t += 10
    # A new agent with no history of its own spends $2 in two minutes, far past the peers' median window
    # (at most $0.15, less as the peers' own windows age while it runs).
    found = run(det, agent("new"), t, t + 120, 6, 100_000)
    f = next(f for f in found if f.dim == "agent")
    assert f.value == "new" and f.baseline_micros == 0 and 0 < f.peers_micros <= 150_000
    assert f.window_micros > 10 * f.peers_micros


def test_below_the_floor_nothing_is_a_runaway():
    det = Detector(CFG)
    a = agent("tiny")
    run(det, a, T0, T0 + 3600, 60, 10)
    assert run(det, a, T0 + 3600, T0 + 3900, 1, 1_000) == []  # 100x its rate, but $0.30 a window


def test_throttle_sets_a_penalty_that_ends_with_the_cool_down():
    det = Detector(CFG.model_copy(update={"action": "throttle", "cooldown": "10m"}))
    a = agent("loop")
    run(det, a, T0, T0 + 3600, 10, 2_000)
    found = run(det, a, T0 + 3600, T0 + 3900, 10, 40_000)
    assert found and all(f.action == "throttle" for f in found)
    at = T0 + 3600 + 300
    dim, left = det.penalty(a, at)
    assert dim in ("agent", "session") and 0 < left <= 600
    assert det.penalty(agent("other"), at) is None
    assert det.penalty(a, at + 601) is None and det.penalties == {}


async def test_a_finding_alerts_once_across_processes_and_every_process_throttles(tmp_path):
    """Two services on one ledger, as two workers: the first finding alerts (webhook + history), the second's is
    claimed already; the penalty reaches the other process with its next reload; the refusal is a 429."""
    receiver = Receiver()
    url = await receiver.start()
    try:
        cfg = {"enabled": True, "by": ["agent"], "window": "5m", "baseline": "1h", "factor": 10,
               "min_spend_usd": "0.50", "action": "throttle", "cooldown": "10m"}
        budgets = [{"name": "global", "limit_usd": 1000}]
        clock = Clock(datetime.fromtimestamp(time.time(), UTC))
        a = service(tmp_path, budgets, clock, alerts={"webhook_url": url}, runaway=cfg)
        b = service(tmp_path, budgets, clock, alerts={"webhook_url": url}, runaway=cfg)
        facts = agent("loop")
        rec = SpendRecord(time.time(), "claude-sonnet-4-5", "anthropic", 1, 1, 0, "usage")
        # No baseline history here (the detector's clock is the wall clock): caught against its peers.
        for i in range(3):
            peer = agent(f"peer{i}")
            for svc in (a, b):
                adm = await svc.admit(f"{id(svc)}-p{i}", Target("anthropic", "cloud", "m", 10_000), None, peer)
                await svc.settle(f"{id(svc)}-p{i}", adm, 10_000, rec)
        for svc in (a, b):
            for i in range(8):
                adm = await svc.admit(f"{id(svc)}-{i}", Target("anthropic", "cloud", "m", 100_000), None, facts)
                if adm.decision.action is Action.REJECT:
                    break
                await svc.settle(f"{id(svc)}-{i}", adm, 100_000, rec)
        await asyncio.sleep(0.5)
        alerts = [p for p in receiver.got if p.get("threshold") == "runaway"]
        assert len(alerts) == 1 and alerts[0]["dimension"] == "agent" and alerts[0]["value"] == "loop"
        assert alerts[0]["window_spend_micros"] > 10 * alerts[0]["peers_median_micros"] > 0
        history = await a.ledger.list_alerts(10)
        assert [(h.budget, h.threshold) for h in history] == [("runaway:agent", "runaway")]
        # A fresh process that never saw the loop refuses it after loading the shared penalties.
        c = service(tmp_path, budgets, clock, runaway=cfg)
        await c.runaway.load()
        adm = await c.admit("c1", Target("anthropic", "cloud", "m", 10), None, facts)
        assert adm.decision.action is Action.REJECT and adm.decision.reason == REJECT_RUNAWAY
        assert adm.short and 0 < adm.reset_in_s <= 600 and adm.budget == "runaway:agent"
        assert (await c.admit("c2", Target("anthropic", "cloud", "m", 10), None, agent("calm"))
                ).decision.action is Action.ALLOW
    finally:
        await receiver.runner.cleanup()
