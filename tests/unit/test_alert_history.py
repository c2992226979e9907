"""Alert delivery policy (Retry-After, jitter, no retry on 4xx but 429) and the alert history it records."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import pytest

from nexus_extproc.budget.alerts import AlertSender
from nexus_extproc.budget.policy import Target
from nexus_extproc.budget.scopes import RequestFacts
from nexus_extproc.budget.service import BudgetService
from nexus_extproc.config import AlertsConfig
from nexus_extproc.edge.webhook import retry_after_seconds
from nexus_extproc.ledger import SpendRecord, open_ledger
from tests.conftest import make_config


class FakeHook:
    def __init__(self, answers: list[tuple[int, float | None]]) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self, url: str, payload: dict, timeout_s: float) -> tuple[int, float | None]:
        self.calls += 1
        return self.answers.pop(0) if self.answers else (200, None)


def sender(hook: FakeHook, attempts: int = 5) -> tuple[AlertSender, list[float]]:
    s = AlertSender(AlertsConfig(webhook_url="http://127.0.0.1:9/h", max_attempts=attempts, backoff_secs=1.0),
                    hook, rng=random.Random(3))
    waits: list[float] = []

    async def sleep(t: float) -> None:
        waits.append(t)

    s.sleep = sleep
    return s, waits


async def test_retry_after_is_honoured_and_backoff_is_jittered():
    hook = FakeHook([(503, 7.0), (500, None), (429, 2.0), (200, None)])
    s, waits = sender(hook)
    s.send({"budget": "b", "period": "p", "threshold": "80"})
    await s.drain(2)
    assert hook.calls == 4
    assert waits[0] == 7.0  # Retry-After beats a 0.5-1.5 s first backoff
    assert 1.0 <= waits[1] <= 3.0 and waits[1] != 2.0  # 2 s backoff, jittered
    assert waits[2] >= 2.0 and 2.0 <= waits[2] <= 6.0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410])
async def test_a_4xx_other_than_429_is_not_retried(status):
    hook = FakeHook([(status, None)])
    s, waits = sender(hook)
    s.send({"budget": "b", "period": "p", "threshold": "80"})
    await s.drain(2)
    assert hook.calls == 1 and waits == []


def test_retry_after_parsing():
    now = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds("Sun, 06 Dec 2026 12:00:30 GMT", now) == 30.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


async def test_alerts_are_stored_with_their_delivery_result_and_acked_once(tmp_path):
    hook = FakeHook([(500, None), (200, None)])
    cfg = make_config(budgets=[{"name": "team-ml", "scope": {"team": "ml"}, "limit_usd": 1,
                                "alert_thresholds": [50]}],
                      store={"kind": "sqlite", "path": str(tmp_path / "l.db"),
                             "outbox_path": str(tmp_path / "o.jsonl")},
                      alerts={"webhook_url": "http://127.0.0.1:9/h", "backoff_secs": 0.0})
    svc = BudgetService(cfg, open_ledger("sqlite", path=str(tmp_path / "l.db")),
                        lambda: datetime(2026, 12, 2, tzinfo=UTC), alerts=None)
    svc.alerts.post = hook
    facts = RequestFacts("gpt-4o", "cloud", team="ml")
    adm = await svc.admit("r1", Target("openai", "cloud", "gpt-4o", 600_000), None, facts)
    await svc.settle("r1", adm, 600_000, SpendRecord(0, "gpt-4o", "openai", 1, 1, 600_000, "usage"))
    for _ in range(100):
        got = [a for a in await svc.admin.alerts.list() if a.threshold == "50"]  # (the forecast alert fires too)
        if got and got[0].delivery != "pending":
            break
        await asyncio.sleep(0.02)
    # the first post got the 500, so the 50 % alert (sent first) took two attempts
    assert [(a.budget, a.threshold, a.delivery, a.attempts) for a in got] == [("team-ml", "50", "delivered", 2)]
    first = await svc.admin.alerts.ack(got[0].id, "alice")
    second = await svc.admin.alerts.ack(got[0].id, "bob")
    assert first is not None and second is not None and second.acked_by == "alice"
    audit = await svc.admin.audit(10)
    assert [(a.actor, a.field) for a in audit if a.field == "alert_ack"] == [("alice", "alert_ack")]
    await svc.ledger.close()
