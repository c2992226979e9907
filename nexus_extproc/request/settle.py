"""Settlement: the final cost from the provider's usage (or our counts), and the ledger write."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from nexus_extproc.apis.errors import internal_error
from nexus_extproc.ledger import ForwardNote, SpendRecord
from nexus_extproc.metering.money import usd_float
from nexus_extproc.metering.pricing import ResolvedPrice, token_usage_counts
from nexus_extproc.metering.tokenizers import heuristic_tokens
from nexus_extproc.metering.usage import TokenUsage
from nexus_extproc.ops import metrics
from nexus_extproc.request.core import Core
from nexus_extproc.request.state import MAX_STREAM_TEXT, Reply, RequestState

log = logging.getLogger(__name__)


class Settlement(Core):
    """The final cost, the forwarded mark and the settlement, once per request."""

    def _streamed_output_tokens(self, state: RequestState) -> int:
        if state.out_chars > MAX_STREAM_TEXT:
            return heuristic_tokens(state.out_chars)
        return self.counter.count_text(state.model, state.out_text).tokens

    def _answered_price(self, state: RequestState) -> ResolvedPrice:
        """The model that answered is what the provider bills (`gpt-4o` asked, `gpt-4o-2024-05-13` answered).
        The request's price stays when the answer names nothing, a model the price database does not know,
        or comes from a local backend; an operator's price override for the asked model beats the database."""
        assert state.price is not None and state.route is not None
        answered = state.usage.model
        if not answered or answered == state.model or state.route.backend_type != "cloud":
            return state.price
        p = self.prices.resolve(state.route.price_provider, answered)
        if not p.known or (state.price.source == "override" and p.source != "override"):
            return state.price
        return p

    def _provider_counts(self, state: RequestState) -> dict[str, int]:
        """The provider's usage in genai-prices' own terms (its extractor for this API); our normalised fields
        only when the block is one the extractor refuses."""
        u = state.usage
        tr = state.translator
        if u.raw is not None and tr is not None:
            try:
                _, counts = self.prices.usage.extract(tr.family, tr.usage_flavor, {"usage": u.raw})
                return counts
            except ValueError:
                log.debug("usage block refused by the price database's extractor", extra={"api": tr.api})
        return token_usage_counts(u.to_usage())

    def compute_final_cost(self, state: RequestState) -> tuple[int, str]:
        """Provider usage if complete; else the prompt count plus output counted from what streamed."""
        if state.final_cost is not None and state.settle_source is not None:
            return state.final_cost, state.settle_source
        assert state.price is not None
        if state.usage_final and state.usage.complete:
            price = self._answered_price(state)
            state.priced_model = price.model
            cost, source = price.cost_micros(self._provider_counts(state)), "usage"
        else:
            # No response at all: only the output that was seen; a response without usage: what streamed, or
            # the expected output for a JSON answer (its usage block was missing).
            seen = state.streaming or state.response_status == 0
            out = self._streamed_output_tokens(state) if seen else state.expected_output
            u = state.usage
            usage = TokenUsage(
                input_tokens=u.input_tokens if u.input_tokens is not None else state.prompt_estimate,
                output_tokens=max(out, u.output_tokens or 0),
                cache_read_tokens=u.cache_read_tokens or 0,
                cache_write_tokens=u.cache_write_tokens or 0,
                web_searches=max(u.web_searches or 0, state.tool_calls),
            )
            cost, source = state.price.cost_micros(usage), "estimated"
        state.final_cost, state.settle_source = cost, source
        return cost, source

    def awaits_report(self, state: RequestState) -> bool:
        return False

    def park(self, state: RequestState) -> None:
        raise NotImplementedError

    def _final_metadata(self, state: RequestState) -> dict[str, Any] | None:
        if state.price is None or state.response_status >= 400:
            return None
        cost, source = self.compute_final_cost(state)
        return {"request_id": state.req_id, "cost_usd": usd_float(cost), "settlement": source,
                "tokens_in": state.usage.input_tokens if state.usage.input_tokens is not None
                else state.prompt_tokens,
                "tokens_out": state.usage.output_tokens or 0}

    def _avoided(self, state: RequestState, cost: int) -> int:
        """A reroute's saving: the asked-for model's price for the usage the local model reported."""
        if state.asked_price is None:
            return 0
        u = state.usage.to_usage() if state.usage_final else TokenUsage(state.prompt_estimate,
                                                                        state.expected_output)
        return max(0, state.asked_price.cost_micros(u) - cost)

    def internal_error(self, state: RequestState) -> Reply:
        """A bug on the request side: answer in the client's shape and give back what was reserved."""
        adm, state.admission = state.admission, None
        if adm is not None:
            task = asyncio.get_running_loop().create_task(self.budget.release(state.req_id, adm))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return self._error(state, internal_error(), "internal")

    async def forwarded(self, state: RequestState) -> None:
        """The request is about to go upstream: from here on the provider bills it, so if this process dies
        before the settlement the reaper charges the reservation instead of releasing it. Awaited before the
        request-body reply goes out: a worker killed right after the reply would otherwise leave a forwarded,
        answered request whose reservation the reaper releases (seen once Envoy stopped sending the response
        headers, which used to turn such a request into a 500)."""
        state.forwarded = True
        adm = state.admission
        if adm is None or not adm.reserved or state.route is None or adm.forward_marked:
            return
        note = ForwardNote(self.model_label(state.model, state.price), state.route.backend,
                           self.model_label(state.parsed.model if state.parsed else state.model,
                                            state.asked_price or state.price),
                           state.prompt_tokens, state.task, state.tags)
        await self.budget.mark_forwarded(state.req_id, note)

    def _record(self, state: RequestState, cost: int, source: str) -> SpendRecord:
        assert state.route is not None and state.price is not None
        usage = state.usage
        priced = (self.prices.resolve(state.route.price_provider, state.priced_model) if state.priced_model
                  else state.price)
        asked = state.parsed.model if state.parsed is not None else state.model
        record = SpendRecord(ts=time.time(), model=self.model_label(priced.model, priced),
                             model_requested=self.model_label(asked, state.asked_price or state.price),
                             backend=state.route.backend,
                             input_tokens=usage.input_tokens if usage.input_tokens is not None
                             else state.prompt_tokens,
                             output_tokens=usage.output_tokens or 0, estimate=state.estimate, source=source,
                             avoided=self._avoided(state, cost), task=state.task, tags=state.tags,
                             team=state.identity.get("team", ""), agent=state.identity.get("agent", ""),
                             tool=state.tool, session=state.session,
                             cache_read_tokens=usage.cache_read_tokens or 0,
                             output_reserved=state.expected_output, streamed=state.streaming)
        return record

    async def finish(self, state: RequestState) -> None:
        """Runs once per stream whatever ended it (clean end, reset, client abort): settle or release."""
        if state.finished or state.awaits_report:
            return
        if self.awaits_report(state):
            self.park(state)  # request/reports.py: Envoy reports the usage when the stream is over
            return
        state.finished = True
        adm = state.admission
        if adm is None or state.route is None or state.price is None:
            return
        # The charge rule (docs/budgets.md): an upstream error without usage is not billed; a request that
        # never left is not billed; one that left and got no answer (the client went away, the stream was
        # reset) is billed for its prompt plus whatever output was seen streaming, since the provider did
        # the work whether or not anyone read it.
        not_billed = state.response_status >= 400 or (state.response_status == 0 and not state.forwarded)
        if not_billed and not state.usage_final:
            await self.budget.release(state.req_id, adm)
            metrics.settlements.labels("released").inc()
            return
        cost, source = self.compute_final_cost(state)
        usage = state.usage
        if state.model and usage.output_tokens is not None:
            self.outputs.record(state.model, usage.output_tokens)
        if source == "usage" and state.asked_price is None and usage.input_tokens is not None \
                and state.parsed is not None:
            self.calibration.observe(self.model_label(state.model, state.price), state.tier,
                                     f"{state.translator.api}:{state.parsed.shape.kind}"
                                     if state.translator else state.parsed.shape.kind,
                                     state.prompt_tokens, usage.input_tokens,
                                     usage.web_searches or 0)
        record = self._record(state, cost, source)
        applied = await self.budget.settle(state.req_id, adm, cost, record)
        if source == "estimate" and not applied:
            # No report came here in time, and another process settled (or released) it from Envoy's report.
            metrics.envoy_reports.labels("elsewhere").inc()
            return
        if state.report_missing:
            metrics.envoy_reports.labels("missing").inc()
        metrics.settlements.labels(source).inc()
        metrics.cost_per_request.labels(self.model_label(state.model, state.price),
                                        state.route.backend_type).observe(usd_float(cost))
