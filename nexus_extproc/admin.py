"""HTTP admin listener: /healthz, /readyz, /metrics, /v1/stats (SPEC §6, §7)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from nexus_extproc.budget import BudgetService
from nexus_extproc.ledger import StoreUnavailable
from nexus_extproc.money import usd_float
from nexus_extproc.policy import STATUS_CODE
from nexus_extproc.reports import parse_range, roll_up, row_dict, to_csv

_ACTION_NAMES = {"warn": "Warn", "block_cloud": "BlockCloud", "block_all": "BlockAll"}


async def stats_doc(budget: BudgetService) -> dict[str, Any]:
    if not budget.enabled:
        return {"budget": None}
    assert budget.budget is not None and budget.ledger is not None
    view = await budget.current_view()
    assert view is not None
    period = budget.period()
    return {"budget": {
        "current_spending_usd": usd_float(view.settled_micros),
        "reserved_usd": usd_float(view.reserved_micros),
        "monthly_limit_usd": usd_float(view.limit_micros),
        "utilization_percent": round(float(view.utilization()), 2),
        "status": view.status(),
        "billing_month": period.key,
        "last_reconciliation": await budget.ledger.get_meta("last_reconciliation"),
        "soft_limit_threshold": float(budget.settings.soft_limit_percent),
        "hard_limit_action": _ACTION_NAMES[budget.settings.hard_limit_action],
        "next_reset_date": period.end.date().isoformat(),
    }}


class BudgetCollector:
    """Budget gauges read from the shared ledger's last totals, so every worker would report the same."""

    def __init__(self, budget: BudgetService) -> None:
        self.budget = budget

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self.budget.enabled:
            return
        view = self.budget.view_of(self.budget.last_totals)
        yield GaugeMetricFamily("nexus_budget_spending_usd", "Settled spend this period (USD)",
                                value=usd_float(view.settled_micros))
        yield GaugeMetricFamily("nexus_budget_reserved_usd", "Reserved, not yet settled (USD)",
                                value=usd_float(view.reserved_micros))
        yield GaugeMetricFamily("nexus_budget_limit_usd", "Budget limit (USD)", value=usd_float(view.limit_micros))
        yield GaugeMetricFamily("nexus_budget_utilization_percent", "(settled + reserved) / limit × 100",
                                value=float(view.utilization()))
        yield GaugeMetricFamily("nexus_budget_status", "0 Normal, 1 SoftLimit, 2 HardLimit",
                                value=STATUS_CODE[view.status()])


def build_admin_app(budget: BudgetService, is_ready: Callable[[], Awaitable[bool]]) -> web.Application:
    multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    if multiproc:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    registry.register(BudgetCollector(budget))

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok = await is_ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        if budget.enabled:
            try:
                await budget.current_view()
            except Exception:  # a store outage must not break the scrape; gauges keep their last value
                pass
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stats(_: web.Request) -> web.Response:
        try:
            return web.json_response(await stats_doc(budget))
        except Exception:
            return web.json_response({"error": "budget store unavailable"}, status=503)

    async def spend(req: web.Request) -> web.Response:
        """Read-only mirror of the admin API's ListSpend for curl users."""
        q = req.query
        try:
            lo, hi = parse_range(q.get("from"), q.get("to"))
            group_by = [g for g in q.get("group_by", "model").split(",") if g]
            fmt = q.get("format", "json")
            if fmt not in ("json", "csv"):
                raise ValueError("format must be json or csv")
            rows = roll_up(await budget.ledger.spend(lo, hi), group_by) if budget.ledger else []
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        except StoreUnavailable:
            return web.json_response({"error": "budget store unavailable"}, status=503)
        if fmt == "csv":
            return web.Response(text=to_csv(rows), content_type="text/csv")
        return web.json_response({"from": lo, "to": hi, "group_by": group_by, "rows": [row_dict(r) for r in rows]})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics),
                    web.get("/v1/stats", stats), web.get("/v1/spend", spend)])
    return app
