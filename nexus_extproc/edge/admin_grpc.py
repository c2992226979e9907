"""The gRPC admin API (BudgetAdminService): read and change budgets at runtime, with a shared-secret token.

Changes are written to the store, so every worker and replica picks them up (within
`server`'s settings refresh, 2 s) and they survive restarts; each change is audited.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import grpc
from google.protobuf import timestamp_pb2

from nexus_extproc.api import budget_admin_pb2 as pb
from nexus_extproc.api import budget_admin_pb2_grpc as pb_grpc
from nexus_extproc.budget.admin import BudgetAdmin as BudgetFacade
from nexus_extproc.budget.book import GLOBAL_BUDGET, BudgetDef, Settings
from nexus_extproc.edge.pb_terms import ACTION_FROM_PB, ACTION_TO_PB, STATUS_TO_PB
from nexus_extproc.ledger import StoreUnavailable

log = logging.getLogger("nexus_extproc.edge.admin_grpc")



def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromSeconds(int(seconds))
    return t


class BudgetAdmin(pb_grpc.BudgetAdminServiceServicer):
    def __init__(self, budget: BudgetFacade, token: str, watch_interval: float = 0.5) -> None:
        self.budget = budget
        self._token = f"Bearer {token}".encode()
        self.watch_interval = watch_interval

    async def _auth(self, context: grpc.aio.ServicerContext) -> None:
        got = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not hmac.compare_digest(str(got).encode(), self._token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid admin token")

    async def _defs(self, name: str, context: grpc.aio.ServicerContext, *, one: bool = False) -> list[BudgetDef]:
        """The named budget; with no name, every budget (or 'global' where one is required)."""
        if not self.budget.enabled:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no budget is configured")
        if not name and one:
            name = GLOBAL_BUDGET if self.budget.find(GLOBAL_BUDGET) else self.budget.defs[0].name
        if not name:
            return list(self.budget.defs)
        d = self.budget.find(name)
        if d is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown budget")
        assert d is not None
        return [d]

    async def _status(self, d: BudgetDef) -> pb.BudgetStatus:
        b = self.budget
        await b.load_settings()
        st = await b.state(d)
        view, s, period = st.view, d.settings, st.period
        out = pb.BudgetStatus(
            name=d.name, period=period.key, limit_micros=view.limit_micros, base_limit_micros=s.limit_micros,
            settled_micros=view.settled_micros, reserved_micros=view.reserved_micros,
            utilization_percent=float(view.utilization()), status=STATUS_TO_PB[view.status()],
            soft_limit_percent=float(s.soft_limit_percent), hard_limit_action=ACTION_TO_PB[s.hard_limit_action],
            next_reset=_ts(period.end.timestamp()))
        if s.override_until is not None and s.override_until > b.now().timestamp():
            out.override_until.CopyFrom(_ts(s.override_until))
        if d.set_by is None:
            out.source = pb.SETTINGS_SOURCE_CONFIG
        else:
            out.source, out.set_by = pb.SETTINGS_SOURCE_RUNTIME, d.set_by
            if d.set_at is not None:
                out.set_at.CopyFrom(_ts(d.set_at))
        return out

    async def GetStatus(self, request: pb.GetStatusRequest,
                        context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        await self._auth(context)
        defs = await self._defs(request.name, context)
        return pb.GetStatusResponse(budgets=[await self._status(d) for d in defs])

    async def SetLimit(self, request: pb.SetLimitRequest,
                       context: grpc.aio.ServicerContext) -> pb.SetLimitResponse:
        await self._auth(context)
        (d,) = await self._defs(request.name, context, one=True)
        if request.limit_micros <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit_micros must be > 0")
        if not 0 <= request.soft_limit_percent <= 100:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "soft_limit_percent must be in (0, 100]")
        await self.budget.load_settings()
        cur = d.settings
        soft = Decimal(str(request.soft_limit_percent)) if request.soft_limit_percent else cur.soft_limit_percent
        new = Settings(request.limit_micros, soft, ACTION_FROM_PB.get(request.hard_limit_action, cur.hard_limit_action),
                       cur.override_limit_micros, cur.override_until)
        await self.budget.update_settings(d.name, new, request.actor or "admin-api")
        return pb.SetLimitResponse(budget=await self._status(d))

    async def ResetLimit(self, request: pb.ResetLimitRequest,
                         context: grpc.aio.ServicerContext) -> pb.ResetLimitResponse:
        await self._auth(context)
        (d,) = await self._defs(request.name, context, one=True)
        await self.budget.reset_settings(d.name, request.actor or "admin-api")
        return pb.ResetLimitResponse(budget=await self._status(d))

    async def SetOverride(self, request: pb.SetOverrideRequest,
                          context: grpc.aio.ServicerContext) -> pb.SetOverrideResponse:
        await self._auth(context)
        (d,) = await self._defs(request.name, context, one=True)
        until = request.until.seconds
        if request.limit_micros <= 0 or until <= self.budget.now().timestamp():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "need limit_micros > 0 and a future 'until'")
        await self.budget.load_settings()
        cur = d.settings
        new = Settings(cur.limit_micros, cur.soft_limit_percent, cur.hard_limit_action, request.limit_micros,
                       float(until))
        await self.budget.update_settings(d.name, new, request.actor or "admin-api")
        return pb.SetOverrideResponse(budget=await self._status(d))

    async def ListSpend(self, request: pb.ListSpendRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListSpendResponse:
        await self._auth(context)
        start = request.__getattribute__("from").seconds if request.HasField("from") else 0
        end = request.to.seconds if request.HasField("to") else time.time() + 86400
        try:
            rows = await self.budget.spend(start, end, list(request.group_by))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.ListSpendResponse(rows=[pb.SpendRow(
            budget=r.budget, model=r.model, day=r.day, requests=r.requests, input_tokens=r.input_tokens,
            output_tokens=r.output_tokens, cost_micros=r.cost_micros, estimate_micros=r.estimate_micros,
            avoided_micros=r.avoided_micros, reaped_micros=r.reaped_micros)
            for r in rows])

    async def ListAudit(self, request: pb.ListAuditRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListAuditResponse:
        await self._auth(context)
        entries = await self.budget.audit(request.limit or 100)
        return pb.ListAuditResponse(entries=[pb.AuditEntry(
            time=_ts(a.ts), actor=a.actor, budget=a.budget, field=a.field, old_value=a.old, new_value=a.new)
            for a in entries])

    async def WatchStatus(self, request: pb.WatchStatusRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchStatusResponse]:
        """Polls the shared store, so it sees transitions caused by any worker or replica."""
        await self._auth(context)
        defs = await self._defs(request.name, context)
        last: dict[str, tuple[int, int]] = {}
        while True:
            for d in defs:
                try:
                    st = await self._status(d)
                except StoreUnavailable:
                    continue
                key = (st.status, st.limit_micros)
                if last.get(d.name) != key:
                    last[d.name] = key
                    yield pb.WatchStatusResponse(budget=st)
            await asyncio.sleep(self.watch_interval)


async def start_admin_api(budget: BudgetFacade, host: str, port: int, token: str | None) -> tuple[
        grpc.aio.Server | None, int]:
    if not token:
        log.warning("admin gRPC API disabled: no token configured (admin_api.token_file or $NEXUS_ADMIN_TOKEN)")
        return None, 0
    server = grpc.aio.server()
    pb_grpc.add_BudgetAdminServiceServicer_to_server(BudgetAdmin(budget, token), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("admin gRPC API serving", extra={"admin_api_port": bound, "since": datetime.now(UTC).isoformat()})
    return server, bound
