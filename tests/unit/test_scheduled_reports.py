"""Scheduled reports: the due window per schedule and timezone, one report per window across two replicas, to a
directory or a webhook, in JSON, CSV or FOCUS."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime

import pytest

from nexus_extproc.budget.policy import Target
from nexus_extproc.budget.scheduled import due_window
from nexus_extproc.budget.service import BudgetService
from nexus_extproc.config import ReportScheduleConfig
from nexus_extproc.ledger import SpendRecord, open_ledger
from tests.conftest import make_config


@pytest.mark.parametrize("every,now,want", [
    ("daily", datetime(2026, 12, 6, 0, 59, tzinfo=UTC), None),
    ("daily", datetime(2026, 12, 6, 1, 0, tzinfo=UTC), "2026-12-05"),
    ("weekly", datetime(2026, 12, 7, 1, 30, tzinfo=UTC), "2026-W49"),  # Monday after ISO week 49
    ("weekly", datetime(2026, 12, 9, 9, 0, tzinfo=UTC), "2026-W49"),
    ("monthly", datetime(2026, 12, 1, 0, 30, tzinfo=UTC), None),
    ("monthly", datetime(2026, 12, 2, 0, 30, tzinfo=UTC), "2026-11"),
])
def test_due_window(every, now, want):
    w = due_window(ReportScheduleConfig(schedule="01:00", every=every, to="/tmp"), now)
    assert (w.key if w else None) == want


def test_due_window_uses_the_schedules_timezone():
    cfg = ReportScheduleConfig(schedule="01:00", timezone="America/New_York", to="/tmp")
    assert due_window(cfg, datetime(2026, 12, 6, 5, 59, tzinfo=UTC)) is None  # 00:59 in New York
    w = due_window(cfg, datetime(2026, 12, 6, 6, 0, tzinfo=UTC))
    assert w is not None and w.key == "2026-12-05" and w.start.utcoffset().total_seconds() == -5 * 3600


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


def replicas(tmp_path, reports: dict, clock: Clock) -> list[BudgetService]:
    cfg = make_config(budgets=[{"name": "global", "limit_usd": 100, "reports": reports}],
                      store={"kind": "sqlite", "path": str(tmp_path / "l.db"), "outbox_path": str(tmp_path / "o")})
    return [BudgetService(cfg, open_ledger("sqlite", path=str(tmp_path / "l.db"), timeout_ms=5000), clock)
            for _ in range(2)]


async def settle_on(svc: BudgetService, rid: str, when: datetime, cost: int) -> None:
    adm = await svc.admit(rid, Target("openai", "cloud", "gpt-4o", cost), None)
    await svc.settle(rid, adm, cost, SpendRecord(when.timestamp(), "gpt-4o", "openai", 100, 10, cost, "usage",
                                                 task="triage"))


@pytest.mark.parametrize("fmt", ["json", "csv", "focus"])
async def test_one_report_per_window_across_replicas(tmp_path, fmt):
    clock = Clock(datetime(2026, 12, 5, 12, 0, tzinfo=UTC))
    a, b = replicas(tmp_path, {"schedule": "01:00", "to": str(tmp_path / "out"), "format": fmt}, clock)
    await settle_on(a, "r1", datetime(2026, 12, 5, 9, tzinfo=UTC), 1_500)
    await settle_on(a, "r2", datetime(2026, 12, 5, 10, tzinfo=UTC), 2_500)
    await settle_on(a, "r3", datetime(2026, 12, 6, 0, 30, tzinfo=UTC), 9_999)  # the next window
    clock.t = datetime(2026, 12, 6, 0, 59, tzinfo=UTC)
    assert await a.reports.run_due() == [] and await b.reports.run_due() == []
    clock.t = datetime(2026, 12, 6, 1, 5, tzinfo=UTC)
    made = await a.reports.run_due() + await b.reports.run_due() + await a.reports.run_due()
    assert len(made) == 1
    ext = "csv" if fmt != "json" else "json"
    path = tmp_path / "out" / f"global-2026-12-05.{ext}"
    assert made == [str(path)] and sorted(p.name for p in (tmp_path / "out").iterdir()) == [path.name]
    text = path.read_text()
    if fmt == "json":
        doc = json.loads(text)
        assert doc["window"] == "2026-12-05" and round(doc["cost_usd"] * 1e6) == 4_000
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert sum(round(float(r["cost_usd"]) * 1e6) for r in rows) == 4_000
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
        assert sum(round(float(r["BilledCost"]) * 1e6) for r in rows) == 4_000 and rows[0]["x_Task"] == "triage"
    for s in (a, b):
        await s.ledger.close()


async def test_reports_to_a_webhook(tmp_path):
    clock = Clock(datetime(2026, 12, 6, 2, 0, tzinfo=UTC))
    a, _ = replicas(tmp_path, {"schedule": "01:00", "to": "http://127.0.0.1:9/reports"}, clock)
    got: list[tuple[str, dict]] = []

    async def post(url: str, payload: dict, timeout_s: float) -> tuple[int, float | None]:
        got.append((url, payload))
        return 204, None

    a.reports.post = post
    await settle_on(a, "r1", datetime(2026, 12, 5, 9, tzinfo=UTC), 700)
    made = await a.reports.run_due()
    assert made == ["http://127.0.0.1:9/reports (204)"]
    assert got[0][1]["window"] == "2026-12-05" and json.loads(got[0][1]["content"])["cost_usd"] == 0.0007
    await a.ledger.close()
