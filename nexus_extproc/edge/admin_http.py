"""HTTP admin listener: /healthz, /readyz, /metrics, /v1/stats (SPEC §6, §7)."""

from __future__ import annotations

import hmac
import math
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from nexus_extproc.budget.admin import BudgetAdmin
from nexus_extproc.budget.book import GLOBAL_BUDGET, BudgetState
from nexus_extproc.budget.focus import to_focus_csv
from nexus_extproc.budget.forecast import forecast
from nexus_extproc.budget.policy import STATUS_CODE, BudgetView
from nexus_extproc.budget.reports import parse_range, row_dict, to_csv
from nexus_extproc.edge.admin_ui import add_ui_routes
from nexus_extproc.ledger import AlertRecord, StoreUnavailable
from nexus_extproc.metering.money import usd_float
from nexus_extproc.ops.ratelimit import RateLimiter
from nexus_extproc.request.calibration import Calibrator

LABELS = ["budget", "billing_month"]
_ACTION_NAMES = {"warn": "Warn", "block_cloud": "BlockCloud", "block_all": "BlockAll"}


def _budget_doc(st: BudgetState, last_reconciliation: str | None) -> dict[str, Any]:
    v, p, s = st.view, st.period, st.defn.settings
    return {
        "current_spending_usd": usd_float(v.settled_micros),
        "reserved_usd": usd_float(v.reserved_micros),
        "monthly_limit_usd": usd_float(v.limit_micros),
        "utilization_percent": round(float(v.utilization()), 2),
        "status": v.status(),
        "billing_month": p.key,
        "last_reconciliation": last_reconciliation,
        "soft_limit_threshold": float(s.soft_limit_percent),
        "hard_limit_action": _ACTION_NAMES[s.hard_limit_action],
        "next_reset_date": p.end.astimezone(st.defn.tz).date().isoformat(),  # the reset day on its own clock
    }


TOP_INSTANCES = 100


async def _instances_doc(budget: BudgetAdmin, st: BudgetState) -> dict[str, Any]:
    """Per-instance figures live here and in reports, never in metric labels: the most utilised 100, and
    the count and sum of all."""
    d = st.defn
    rows = await budget.insights.instances(d)
    limit = d.settings.limit_at(budget.now().timestamp())
    views = sorted(rows, key=lambda nt: -(nt[1].settled + nt[1].reserved))
    top = []
    for name, t in views[:TOP_INSTANCES]:
        v = BudgetView(limit, t.settled, t.reserved, d.settings.soft_limit_percent, d.settings.hard_limit_action)
        top.append({"name": name, "value": name.split("/", 1)[1], "current_spending_usd": usd_float(t.settled),
                    "reserved_usd": usd_float(t.reserved), "utilization_percent": round(float(v.utilization()), 2),
                    "status": v.status()})
    return {"by": list(d.distinct), "instances": len(rows), "max_instances": d.max_instances,
            "instance_limit_usd": usd_float(limit), "total_spending_usd": usd_float(sum(t.settled for _, t in rows)),
            "overflow_spending_usd": usd_float((await budget.insights.overflow(d)).settled), "top": top}


async def stats_doc(budget: BudgetAdmin, calibration: Calibrator | None = None) -> dict[str, Any]:
    """SPEC §6: `budget` is the global budget (null without one); `budgets` lists every budget; `calibration`
    the learned estimate ratios (docs/budgets.md)."""
    if not budget.enabled:
        return {"budget": None, "calibration": calibration.snapshot() if calibration else []}
    last = await budget.last_reconciliation()
    states = [await budget.state(d) for d in budget.defs]
    out: dict[str, Any] = {"budget": None, "budgets": []}
    for st in states:
        doc = _budget_doc(st, last)
        if st.defn.name == GLOBAL_BUDGET:
            out["budget"] = dict(doc)
        scope = st.defn.scope
        doc.update({
            "name": st.defn.name, "period": st.defn.period_kind, "period_key": st.period.key,
            # A short window (rolling, hourly, every): its length and the span its spend covers now.
            "window": None if not st.defn.rule.short else {
                "kind": st.defn.rule.kind, "seconds": st.defn.rule.seconds,
                "start": st.period.start.isoformat(), "end": st.period.end.isoformat()},
            "limit_usd": doc.pop("monthly_limit_usd"),
            "scope": "global" if scope is None else scope.model_dump(exclude_none=True),
            "forecast_usd": usd_float(st.forecast.projected_micros),
            "exhaustion_in_seconds": st.forecast.exhaustion_in_s,
            "settings": BudgetAdmin.provenance(st.defn),
            "forecasts": (await budget.insights.forecast(st.defn)).doc(),
            "active": st.defn.settings.active,
            "origin": st.defn.origin,
        })
        if st.defn.unit == "tokens":  # its figures are tokens, not dollars
            v = st.view
            doc.update({"unit": "tokens", "limit_usd": None, "current_spending_usd": None, "reserved_usd": None,
                        "forecast_usd": None, "forecasts": None, "limit_tokens": v.limit_micros,
                        "current_tokens": v.settled_micros, "reserved_tokens": v.reserved_micros})
        else:
            doc["unit"] = "usd"
        if st.defn.distinct:
            doc["distinct"] = await _instances_doc(budget, st)
        del doc["billing_month"]
        out["budgets"].append(doc)
    out["calibration"] = calibration.snapshot() if calibration else []
    return out


class BudgetCollector:
    """Budget gauges per budget, from the shared ledger's totals as last read, so every worker agrees. Each
    carries the seed's `billing_month`: the budget's current period key (`2026-12`, or the day or week key
    for daily and weekly budgets), so a past period's series ends when its period does."""

    def __init__(self, budget: BudgetAdmin) -> None:
        self.budget = budget

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self.budget.enabled:
            return
        fams = {
            "spending": GaugeMetricFamily("nexus_budget_spending_usd", "Settled spend this period (USD)",
                                          labels=LABELS),
            "reserved": GaugeMetricFamily("nexus_budget_reserved_usd", "Reserved, not yet settled (USD)",
                                          labels=LABELS),
            "limit": GaugeMetricFamily("nexus_budget_limit_usd", "Budget limit (USD)", labels=LABELS),
            "util": GaugeMetricFamily("nexus_budget_utilization_percent", "(settled + reserved) / limit × 100",
                                      labels=LABELS),
            "status": GaugeMetricFamily("nexus_budget_status", "0 Normal, 1 SoftLimit, 2 HardLimit",
                                        labels=LABELS),
            "forecast": GaugeMetricFamily("nexus_budget_forecast_usd", "Projected spend at period end (USD)",
                                          labels=LABELS),
            "exhaustion": GaugeMetricFamily("nexus_budget_exhaustion_seconds",
                                            "Projected seconds until the limit is reached (+Inf: not this period)",
                                            labels=LABELS),
            "tokens": GaugeMetricFamily("nexus_budget_spending_tokens", "A token budget's settled tokens this period",
                                        labels=LABELS),
            "tokens_reserved": GaugeMetricFamily("nexus_budget_reserved_tokens",
                                                 "A token budget's reserved tokens, not yet settled", labels=LABELS),
            "tokens_limit": GaugeMetricFamily("nexus_budget_limit_tokens", "A token budget's limit (tokens)",
                                              labels=LABELS),
        }
        inst = {
            "count": GaugeMetricFamily("nexus_budget_instances", "Distinct-value budget instances this period",
                                       labels=["budget"]),
            "spent": GaugeMetricFamily("nexus_budget_instances_spending_usd",
                                       "Settled spend over all instances of a distinct-value budget (USD)",
                                       labels=["budget"]),
            "hard": GaugeMetricFamily("nexus_budget_instances_at_limit",
                                      "Instances of a distinct-value budget at or past their limit", labels=["budget"]),
        }
        now = self.budget.now()
        for d in self.budget.defs:
            if d.distinct:  # the definition's name only: instance values never become labels
                n, spent, hard = self.budget.insights.instance_summary(d)
                inst["count"].add_metric([d.name], n)
                inst["spent"].add_metric([d.name], usd_float(spent))
                inst["hard"].add_metric([d.name], hard)
            view = self.budget.last_view(d)
            p = d.period(now)
            fc = forecast(view.settled_micros, view.limit_micros, p.start.timestamp(), p.end.timestamp(),
                          now.timestamp())
            labels = [d.name, p.key]
            fams["util"].add_metric(labels, float(view.utilization()))
            fams["status"].add_metric(labels, STATUS_CODE[view.status()])
            if d.unit == "tokens":  # in tokens, under their own names: never a token count in a *_usd series
                fams["tokens"].add_metric(labels, view.settled_micros)
                fams["tokens_reserved"].add_metric(labels, view.reserved_micros)
                fams["tokens_limit"].add_metric(labels, view.limit_micros)
                continue
            fams["spending"].add_metric(labels, usd_float(view.settled_micros))
            fams["reserved"].add_metric(labels, usd_float(view.reserved_micros))
            fams["limit"].add_metric(labels, usd_float(view.limit_micros))
            fams["forecast"].add_metric(labels, usd_float(fc.projected_micros))
            fams["exhaustion"].add_metric(labels, math.inf if fc.exhaustion_in_s is None else fc.exhaustion_in_s)
        has_tokens = any(d.unit == "tokens" for d in self.budget.defs)
        yield from (f for k, f in fams.items() if has_tokens or not k.startswith("tokens"))
        if any(d.distinct for d in self.budget.defs):
            yield from inst.values()


def build_admin_app(budget: BudgetAdmin, is_ready: Callable[[], Awaitable[bool]],
                    calibration: Calibrator | None = None, token: str | None = None,
                    limiter: RateLimiter | None = None) -> web.Application:
    """/healthz, /readyz, /metrics and the page's files stay open; /v1/* needs the admin token when one is
    configured, and is rate limited per credential."""
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
                for d in budget.defs:
                    await budget.state(d)
            except Exception:  # a store outage must not break the scrape; gauges keep their last value
                pass
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stats(_: web.Request) -> web.Response:
        try:
            return web.json_response(await stats_doc(budget, calibration))
        except Exception:
            return web.json_response({"error": "budget store unavailable"}, status=503)

    async def spend(req: web.Request) -> web.Response:
        """Read-only mirror of the admin API's ListSpend for curl users."""
        q = req.query
        try:
            lo, hi = parse_range(q.get("from"), q.get("to"))
            group_by = [g for g in q.get("group_by", "model").split(",") if g]
            fmt = q.get("format", "json")
            if fmt not in ("json", "csv", "focus"):
                raise ValueError("format must be json, csv or focus")
            if fmt == "focus":
                return web.Response(text=to_focus_csv(await budget.insights.focus(lo, hi)), content_type="text/csv",
                                    headers={"Content-Disposition": "attachment; filename=nexus-focus.csv"})
            rows = await budget.spend(lo, hi, group_by)
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        except StoreUnavailable:
            return web.json_response({"error": "budget store unavailable"}, status=503)
        if fmt == "csv":
            return web.Response(text=to_csv(rows), content_type="text/csv")
        return web.json_response({"from": lo, "to": hi, "group_by": group_by, "rows": [row_dict(r) for r in rows]})

    async def alerts(req: web.Request) -> web.Response:
        try:
            limit = int(req.query.get("limit", "50"))
            rows = await budget.alerts.list(limit)
        except ValueError:
            return web.json_response({"error": "limit must be an integer"}, status=400)
        except StoreUnavailable:
            return web.json_response({"error": "budget store unavailable"}, status=503)
        return web.json_response({"alerts": [alert_doc(a) for a in rows]})

    async def recommendations(req: web.Request) -> web.Response:
        try:
            lo, hi = parse_range(req.query.get("from"), req.query.get("to"))
            recs = await budget.insights.recommendations(lo, hi)
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        except StoreUnavailable:
            return web.json_response({"error": "budget store unavailable"}, status=503)
        return web.json_response({"from": lo, "to": hi, "recommendations": [r.doc() for r in recs]})

    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        got = request.headers.get("Authorization", "")
        if limiter is not None and not limiter.allow(RateLimiter.key(got, request.remote or "")):
            return web.json_response({"error": "admin API rate limit exceeded; retry later"}, status=429,
                                     headers={"Retry-After": "1"})
        if expected is not None and not hmac.compare_digest(got.encode(), expected):
            return web.json_response({"error": "missing or invalid admin token (Authorization: Bearer ...)"},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    app = web.Application(middlewares=[guard])
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics),
                    web.get("/v1/stats", stats), web.get("/v1/spend", spend), web.get("/v1/alerts", alerts),
                    web.get("/v1/recommendations", recommendations)])
    add_ui_routes(app, lambda: stats_doc(budget, calibration))
    return app


def alert_doc(a: AlertRecord) -> dict[str, Any]:
    return {"id": a.id, "ts": a.ts, "budget": a.budget, "period": a.period, "threshold": a.threshold,
            "spend_usd": usd_float(a.spend_micros), "limit_usd": usd_float(a.limit_micros), "delivery": a.delivery,
            "attempts": a.attempts, "acked_by": a.acked_by, "acked_at": a.acked_at}
