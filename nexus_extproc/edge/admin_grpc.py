"""The gRPC admin API (BudgetAdminService): read and change budgets at runtime, with a shared-secret token.

Changes are written to the store, so every worker and replica picks them up (within
`server`'s settings refresh, 2 s) and they survive restarts; each change is audited.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import grpc

from nexus_extproc.api import budget_admin_pb2 as pb
from nexus_extproc.api import budget_admin_pb2_grpc as pb_grpc
from nexus_extproc.budget.admin import BudgetAdmin as BudgetFacade
from nexus_extproc.budget.book import Settings
from nexus_extproc.edge.admin_grpc_base import AdminBase, range_of, ts_pb
from nexus_extproc.edge.admin_grpc_finops import FinOpsRpcs, LifecycleRpcs
from nexus_extproc.edge.pb_terms import ACTION_FROM_PB
from nexus_extproc.ledger import StoreUnavailable
from nexus_extproc.ops.ratelimit import RateLimiter

log = logging.getLogger("nexus_extproc.edge.admin_grpc")



class BudgetAdmin(LifecycleRpcs, FinOpsRpcs, AdminBase, pb_grpc.BudgetAdminServiceServicer):
    """Settings and status RPCs here; budget lifecycle and FinOps RPCs in admin_grpc_finops.py."""

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
                       cur.override_limit_micros, cur.override_until, cur.active)
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
                       float(until), cur.active)
        await self.budget.update_settings(d.name, new, request.actor or "admin-api")
        return pb.SetOverrideResponse(budget=await self._status(d))

    async def ListSpend(self, request: pb.ListSpendRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListSpendResponse:
        await self._auth(context)
        start, end = range_of(request)
        try:
            rows = await self.budget.spend(start, end, list(request.group_by))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.ListSpendResponse(rows=[pb.SpendRow(
            budget=r.budget, model=r.model, day=r.day, requests=r.requests, input_tokens=r.input_tokens,
            output_tokens=r.output_tokens, cost_micros=r.cost_micros, estimate_micros=r.estimate_micros,
            avoided_micros=r.avoided_micros, reaped_micros=r.reaped_micros, week=r.week, month=r.month,
            backend=r.backend, task=r.task, tag=r.tag, team=r.team)
            for r in rows])

    async def ListAudit(self, request: pb.ListAuditRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListAuditResponse:
        await self._auth(context)
        entries = await self.budget.audit(request.limit or 100)
        return pb.ListAuditResponse(entries=[pb.AuditEntry(
            time=ts_pb(a.ts), actor=a.actor, budget=a.budget, field=a.field, old_value=a.old, new_value=a.new)
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


async def start_admin_api(budget: BudgetFacade, host: str, port: int, token: str | None,
                          limiter: RateLimiter | None = None) -> tuple[grpc.aio.Server | None, int]:
    if not token:
        log.warning("admin gRPC API disabled: no token configured (admin_api.token_file or $NEXUS_ADMIN_TOKEN)")
        return None, 0
    server = grpc.aio.server()
    pb_grpc.add_BudgetAdminServiceServicer_to_server(BudgetAdmin(budget, token, limiter=limiter), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("admin gRPC API serving", extra={"admin_api_port": bound, "since": datetime.now(UTC).isoformat()})
    return server, bound
