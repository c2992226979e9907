"""The admin gRPC API's shared parts: the token check, finding a budget, rendering its status."""

from __future__ import annotations

import contextlib
import hmac
import time
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from nexus_extproc.api import budget_admin_pb2 as pb
from nexus_extproc.budget.admin import BudgetAdmin as BudgetFacade
from nexus_extproc.budget.book import GLOBAL_BUDGET, BudgetDef
from nexus_extproc.budget.forecast import Projection
from nexus_extproc.budget.projection import BudgetProjection
from nexus_extproc.edge.pb_terms import ACTION_TO_PB, STATUS_TO_PB
from nexus_extproc.ledger import StoreUnavailable
from nexus_extproc.ops.ratelimit import RateLimiter


def ts_pb(seconds: float) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromSeconds(int(seconds))
    return t


class AdminBase:
    """What every admin RPC shares: the token check, finding budgets, rendering a status."""

    def __init__(self, budget: BudgetFacade, token: str, watch_interval: float = 0.5,
                 limiter: RateLimiter | None = None) -> None:
        self.budget = budget
        self._token = f"Bearer {token}".encode()
        self.watch_interval = watch_interval
        self.limiter = limiter or RateLimiter(20.0, 40)

    async def _auth(self, context: grpc.aio.ServicerContext) -> None:
        got = str(dict(context.invocation_metadata() or ()).get("authorization", ""))
        if not self.limiter.allow(RateLimiter.key(got, context.peer() or "")):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "admin API rate limit exceeded; retry later")
        if not hmac.compare_digest(got.encode(), self._token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid admin token")

    async def _defs(self, name: str, context: grpc.aio.ServicerContext, *, one: bool = False) -> list[BudgetDef]:
        """The named budget; with no name, every budget (or 'global' where one is required)."""
        with contextlib.suppress(StoreUnavailable):
            await self.budget.load_settings()  # budgets another replica created a moment ago
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
            # A short window's key names a bucket; the operator reads the window ("rolling 15m") instead.
            name=d.name, period=d.period_kind if d.rule.short else period.key, limit_micros=view.limit_micros,
            base_limit_micros=s.limit_micros,
            settled_micros=view.settled_micros, reserved_micros=view.reserved_micros,
            utilization_percent=float(view.utilization()), status=STATUS_TO_PB[view.status()],
            soft_limit_percent=float(s.soft_limit_percent), hard_limit_action=ACTION_TO_PB[s.hard_limit_action],
            next_reset=ts_pb(period.end.timestamp()))
        if s.override_until is not None and s.override_until > b.now().timestamp():
            out.override_until.CopyFrom(ts_pb(s.override_until))
        if d.set_by is None:
            out.source = pb.SETTINGS_SOURCE_CONFIG
        else:
            out.source, out.set_by = pb.SETTINGS_SOURCE_RUNTIME, d.set_by
            if d.set_at is not None:
                out.set_at.CopyFrom(ts_pb(d.set_at))
        out.active = s.active
        out.origin = pb.BUDGET_ORIGIN_RUNTIME if d.origin == "runtime" else pb.BUDGET_ORIGIN_CONFIG
        out.distinct_by.extend(d.distinct)
        if d.distinct:
            out.instances = len(await b.insights.instances(d))
        with contextlib.suppress(StoreUnavailable):
            out.forecast.CopyFrom(forecast_pb(await b.insights.forecast(d)))
        return out



def range_of(request: Any) -> tuple[float, float]:
    """A request's `from`/`to` timestamps; unset: from the epoch, to a day ahead."""
    start = request.__getattribute__("from").seconds if request.HasField("from") else 0
    end = request.to.seconds if request.HasField("to") else time.time() + 86400
    return float(start), float(end)


def projection_pb(p: Projection) -> pb.Projection:
    return pb.Projection(days=p.days, point_micros=p.point_micros, low_micros=p.low_micros, high_micros=p.high_micros)


def forecast_pb(p: BudgetProjection) -> pb.BudgetForecast:
    return pb.BudgetForecast(trend=p.series.trend, history_days=p.series.history_days,
                             horizons=[projection_pb(h) for h in p.series.horizons],
                             end_of_period=projection_pb(p.end_of_period), overrun_likely=p.overrun_likely)
