"""Admin RPCs for the budget lifecycle (CreateBudget, DeleteBudget, SetActive) and FinOps reads (GetForecast,
ListAlerts, AckAlert, ListRecommendations, ExportSpend). Mixed into the one servicer (admin_grpc.py)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import grpc
from pydantic import ValidationError

from nexus_extproc.api import budget_admin_pb2 as pb
from nexus_extproc.budget.book import Settings
from nexus_extproc.budget.focus import to_focus_csv
from nexus_extproc.budget.periods import period_value
from nexus_extproc.budget.reports import to_csv
from nexus_extproc.config import BudgetDefConfig, ScopeConfig
from nexus_extproc.edge.admin_grpc_base import AdminBase, forecast_pb, range_of, ts_pb
from nexus_extproc.edge.pb_terms import ACTION_FROM_PB
from nexus_extproc.ledger import AlertRecord


def alert_pb(a: AlertRecord) -> pb.Alert:
    out = pb.Alert(id=a.id, time=ts_pb(a.ts), budget=a.budget, period=a.period, threshold=a.threshold,
                   spend_micros=a.spend_micros, limit_micros=a.limit_micros, delivery=a.delivery,
                   attempts=a.attempts, acked_by=a.acked_by or "")
    if a.acked_at is not None:
        out.acked_at.CopyFrom(ts_pb(a.acked_at))
    return out


class LifecycleRpcs(AdminBase):
    async def CreateBudget(self, request: pb.CreateBudgetRequest,
                           context: grpc.aio.ServicerContext) -> pb.CreateBudgetResponse:
        await self._auth(context)
        if not self.budget.runtime.available:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no budget store is configured")
        if bool(request.limit_micros) == bool(request.limit_tokens):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give limit_micros or limit_tokens (one)")
        spec: dict[str, Any] = {"name": request.name}
        if request.limit_micros:
            spec["limit_usd"] = Decimal(request.limit_micros) / 1_000_000
        else:
            spec["limit_tokens"] = request.limit_tokens
        if request.HasField("scope"):
            # BudgetScope carries ScopeConfig's fields by name (a unit test holds them equal).
            spec["scope"] = {k: getattr(request.scope, k) for k in ScopeConfig.model_fields
                             if getattr(request.scope, k)}
        for key, value in (("period", period_value(request.period) if request.period else ""),
                           ("timezone", request.timezone), ("max_instances", request.max_instances)):
            if value:
                spec[key] = value
        if request.models:
            spec["models"] = list(request.models)
        if request.soft_limit_percent:
            spec["soft_limit_percent"] = Decimal(str(request.soft_limit_percent))
        if request.hard_limit_action:
            spec["hard_limit_action"] = ACTION_FROM_PB[request.hard_limit_action]
        if request.alert_thresholds:
            spec["alert_thresholds"] = [Decimal(str(t)) for t in request.alert_thresholds]
        spec["active"] = not request.inactive
        try:
            cfg = BudgetDefConfig.model_validate(spec)
        except ValidationError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(
                f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()))
        try:
            d = await self.budget.runtime.create(cfg, request.actor or "admin-api")
        except ValueError as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        return pb.CreateBudgetResponse(budget=await self._status(d))

    async def DeleteBudget(self, request: pb.DeleteBudgetRequest,
                           context: grpc.aio.ServicerContext) -> pb.DeleteBudgetResponse:
        await self._auth(context)
        (d,) = await self._defs(request.name, context, one=True)
        try:
            await self.budget.runtime.delete(d.name, request.actor or "admin-api")
        except ValueError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.DeleteBudgetResponse()

    async def SetActive(self, request: pb.SetActiveRequest,
                        context: grpc.aio.ServicerContext) -> pb.SetActiveResponse:
        await self._auth(context)
        (d,) = await self._defs(request.name, context, one=True)
        await self.budget.load_settings()
        cur = d.settings
        new = Settings(cur.limit_micros, cur.soft_limit_percent, cur.hard_limit_action, cur.override_limit_micros,
                       cur.override_until, request.active)
        await self.budget.update_settings(d.name, new, request.actor or "admin-api")
        return pb.SetActiveResponse(budget=await self._status(d))


class FinOpsRpcs(AdminBase):
    async def GetForecast(self, request: pb.GetForecastRequest,
                          context: grpc.aio.ServicerContext) -> pb.GetForecastResponse:
        await self._auth(context)
        (d,) = await self._defs(request.name, context, one=True)
        return pb.GetForecastResponse(name=d.name, forecast=forecast_pb(await self.budget.insights.forecast(d)))

    async def ListAlerts(self, request: pb.ListAlertsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListAlertsResponse:
        await self._auth(context)
        return pb.ListAlertsResponse(alerts=[alert_pb(a) for a in await self.budget.alerts.list(request.limit or 100)])

    async def AckAlert(self, request: pb.AckAlertRequest,
                       context: grpc.aio.ServicerContext) -> pb.AckAlertResponse:
        await self._auth(context)
        rec = await self.budget.alerts.ack(request.id, request.actor or "admin-api")
        if rec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown alert")
        assert rec is not None
        return pb.AckAlertResponse(alert=alert_pb(rec))

    async def ListRecommendations(self, request: pb.ListRecommendationsRequest,
                                  context: grpc.aio.ServicerContext) -> pb.ListRecommendationsResponse:
        await self._auth(context)
        start, end = range_of(request)
        recs = await self.budget.insights.recommendations(start, end)
        return pb.ListRecommendationsResponse(recommendations=[pb.Recommendation(
            kind=r.kind, subject=r.subject, summary=r.summary, potential_saving_micros=r.potential_saving_micros,
            data_json=r.data_json()) for r in recs])

    async def ExportSpend(self, request: pb.ExportSpendRequest,
                          context: grpc.aio.ServicerContext) -> pb.ExportSpendResponse:
        await self._auth(context)
        start, end = range_of(request)
        if request.format in ("", "focus"):
            text = to_focus_csv(await self.budget.insights.focus(start, end))
        elif request.format == "csv":
            try:
                text = to_csv(await self.budget.insights.spend(start, end, list(request.group_by) or ["day"]))
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "format must be focus or csv")
        return pb.ExportSpendResponse(content_type="text/csv", data=text.encode())
