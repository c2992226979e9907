"""Estimation: the prompt count and the expected output a request reserves for."""

from __future__ import annotations

import asyncio
import logging
import time

from nexus_extproc.apis import ParsedRequest, Translator
from nexus_extproc.budget.policy import Target
from nexus_extproc.metering.pricing import ResolvedPrice
from nexus_extproc.ops import metrics
from nexus_extproc.request.core import Core
from nexus_extproc.request.router import Route

log = logging.getLogger(__name__)


class Estimation(Core):
    """The estimate a request reserves: its prompt count and its expected output."""

    async def _count(self, model: str, parsed: ParsedRequest) -> tuple[int, str]:
        t0 = time.perf_counter()
        if parsed.shape.total_bytes() > self.config.server.thread_tokenize_bytes:
            # tiktoken releases the GIL: a 100 KB prompt counts in a thread while other streams go on.
            tc = await asyncio.to_thread(self.counter.count_prompt, model, parsed.shape)
        else:
            tc = self.counter.count_prompt(model, parsed.shape)
        metrics.token_count_duration.observe(time.perf_counter() - t0)
        return tc.tokens + parsed.token_ids, tc.tier

    def _expected_output(self, model: str, parsed: ParsedRequest, translator: Translator) -> int:
        cap = parsed.max_output_tokens
        if cap is None:
            cap = translator.default_max_output
        typical = self.outputs.p95(model)
        if typical is None:
            typical = self.config.estimation.default_output_tokens
        return typical if cap is None else min(cap, typical)

    def _target(self, route: Route, model: str, prompt_tokens: int, expected_out: int,
                tool_calls: int = 0) -> tuple[Target, ResolvedPrice]:
        price = self.prices.resolve(route.price_provider, model)
        est = price.estimate_micros(prompt_tokens, expected_out, tool_calls)
        return Target(route.backend, route.backend_type, model, est,  # type: ignore[arg-type]
                      prompt_tokens + expected_out), price
