"""The request path's shared core; the phases are in inbound.py, outbound.py and settle.py."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any

from nexus_extproc.apis.errors import (
    NexusError,
    render_error,
)
from nexus_extproc.budget.policy import Action
from nexus_extproc.budget.service import BudgetService
from nexus_extproc.config import NexusConfig
from nexus_extproc.metering.money import format_usd
from nexus_extproc.metering.pricing import PriceBook, ResolvedPrice
from nexus_extproc.metering.tokenizers import TokenCounter
from nexus_extproc.ops import metrics
from nexus_extproc.request import headers as C
from nexus_extproc.request.calibration import Calibrator
from nexus_extproc.request.router import Router
from nexus_extproc.request.state import Immediate, Reply, RequestState

log = logging.getLogger(__name__)


class OutputStats:
    """Observed output lengths per model, for the expected-output estimate (p95 of recent responses)."""

    def __init__(self, window: int) -> None:
        self._window = window
        self._seen: dict[str, list[int]] = {}

    def record(self, model: str, tokens: int) -> None:
        xs = self._seen.setdefault(model, [])
        xs.append(tokens)
        if len(xs) > self._window:
            del xs[: len(xs) - self._window]

    def p95(self, model: str) -> int | None:
        xs = self._seen.get(model)
        if not xs or len(xs) < 20:
            return None
        s = sorted(xs)
        return s[min(len(s) - 1, (len(s) * 95) // 100)]


class Core:
    """What every phase shares: the components, the model label, error replies and budget headers."""

    def __init__(self, config: NexusConfig, counter: TokenCounter, prices: PriceBook, budget: BudgetService,
                 router: Router) -> None:
        self.config = config
        self.counter = counter
        self.prices = prices
        self.budget = budget
        self.router = router
        self.outputs = OutputStats(config.estimation.p95_window)
        est = config.estimation
        self.calibration = Calibrator(est.calibration_half_life_hours * 3600, est.calibration_flush_secs,
                                      enabled=est.calibration)
        self._known_models = config.configured_models()
        self._background: set[asyncio.Task[None]] = set()
        # server.settlement: envoy — forwarded streams whose usage Envoy reports, by request id.
        self._settlement = config.server.settlement
        self._awaiting: dict[str, tuple[RequestState, asyncio.TimerHandle]] = {}
        self._early: dict[str, tuple[float, Any]] = {}  # reports that came before their stream ended
        self._late: dict[str, tuple[float, RequestState]] = {}  # settled at the estimate: a report may still come
        self.worker = 0  # this process's worker index: Envoy sends each report to the worker named in its metadata
        # This process, among every pod's and worker's: a report for a request it did not admit is settled from
        # the request's snapshot; one for its own waits for its stream (request/reports.py).
        self.instance = uuid.uuid4().hex[:16]
        self._trust_identity = config.identity.trust_identity_headers
        self._trust_attribution = config.identity.trust_attribution_headers
        # Hash the caller's API key only when some budget is scoped by key (an HMAC per request otherwise).
        self._need_key = any(d.scope is not None and d.scope.api_key_hash for d in budget.defs)
        self._salt = os.environ.get(config.identity.api_key_salt_env, "").encode()
        if self._need_key and not self._salt:
            log.warning("budgets scoped by API key but $%s is empty: hashes use an empty salt",
                        config.identity.api_key_salt_env)

    # ---- helpers -------------------------------------------------------------------------------

    def settles_in_envoy(self, declared: bool) -> bool:
        """Whether Envoy reads this stream's response (server.settlement): forced by the config, or as the stream's
        Envoy declares it (`auto`)."""
        return self._settlement == "envoy" or (self._settlement == "auto" and declared)

    def model_label(self, model: str | None, price: ResolvedPrice | None) -> str:
        if model and (model in self._known_models or (price is not None and price.known)):
            return model
        return "other"

    def _error(self, state: RequestState, err: NexusError, reason: str) -> Reply:
        if err.status < 500:
            metrics.bad_requests.labels(reason).inc()
        # The filter's own answers carry the same X-Nexus-* headers as a forwarded one, as far as the request got:
        # no estimate or tier for a body that could not be parsed, no budget status before admission.
        headers = [("content-type", "application/json"), *err.headers.items(), (C.H_REQUEST_ID, state.req_id)]
        if state.route is not None:
            headers.append((C.H_BACKEND_TYPE, state.route.backend_type))
        if state.counted:
            headers.append((C.H_TOKEN_TIER, state.tier))
        if state.estimated:
            headers.append((C.H_COST_ESTIMATED, format_usd(state.estimate)))
        headers.extend(self._budget_headers(state))
        return Reply(immediate=Immediate(err.status, render_error(state.family, err), headers,
                                         f"nexus_{err.code}"))

    def _nexus_headers(self, state: RequestState) -> list[tuple[str, str]]:
        """The X-Nexus-* headers of an answer that passed the filter. All are known once the request is
        admitted, so they also travel as request-phase metadata that Envoy's route turns into response headers
        without a response-headers exchange."""
        assert state.route is not None
        return [(C.H_COST_ESTIMATED, format_usd(state.estimate)), (C.H_BACKEND_TYPE, state.route.backend_type),
                (C.H_TOKEN_TIER, state.tier), (C.H_REQUEST_ID, state.req_id), *self._budget_headers(state)]

    def _budget_headers(self, state: RequestState) -> list[tuple[str, str]]:
        adm = state.admission
        out: list[tuple[str, str]] = []
        if adm is None or adm.view is None:
            return out
        view = adm.view
        d = adm.decision
        always = self.budget.always_headers
        if d.status != "Normal" or always:
            if adm.budget is not None:
                out.append((C.H_BUDGET_NAME, adm.budget))
            out.append((C.H_BUDGET_STATUS, d.status))
            out.append((C.H_BUDGET_UTILIZATION, f"{min(view.utilization(), 9999):.2f}"))
            if view.unit == "tokens":  # a token budget decided: its remaining tokens, and the unit said
                out.append((C.H_BUDGET_REMAINING, str(view.remaining_micros)))
                out.append((C.H_BUDGET_UNIT, "tokens"))
            else:
                out.append((C.H_BUDGET_REMAINING, format_usd(view.remaining_micros, 2)))
        if d.reason and d.action is Action.REROUTE:
            out.append((C.H_ROUTE_REASON, d.reason))
        return out
