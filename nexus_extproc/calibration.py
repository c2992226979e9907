"""Self-calibrating prompt estimates: learn how far our count is from what the provider bills.

Every settlement with provider usage is one sample per key (model, tier, shape): the provider's input tokens
against our count, and the server-side tool calls it made. The sums decay with a half-life in time, so old
traffic fades while the ratio itself only moves when new samples arrive. They live in the ledger, so every
replica learns from all of them and a restart keeps them: each replica adds what it saw since its last flush
and reads back everyone's, every `flush_secs` (off the request path; a request only does a dict lookup).

Applied where our count is known to differ: the approximation and heuristic tiers (models we cannot tokenize),
and exact-tier shapes with input we cannot see (server-side search results, images, tool preambles). A plain
exact-tier prompt is a count, not an estimate, and is left alone.

How a learned figure is applied, and its bounds:
- ratio shapes: tokens × (provider ÷ ours), clamped to [RATIO_MIN, RATIO_MAX];
- server-tool shapes (search results are fed back as input, whatever the prompt's size): tokens + the mean
  extra tokens per request, clamped to [0, EXTRA_MAX], and the mean tool calls per request, at least one.
The model's own key is used once it has a sample; before that, the all-models key for the same tier and shape.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from nexus_extproc import metrics
from nexus_extproc.ledger import Ledger, StoreUnavailable
from nexus_extproc.ledger.base import CalibrationSums

log = logging.getLogger(__name__)

RATIO_MIN, RATIO_MAX = 0.5, 4.0
EXTRA_MAX = 2_000_000
MIN_SAMPLES = 1.0
# Before any sample: what one server-side search feeds back, from the recorded exchanges (OpenAI web search
# ~9.3k input tokens, Anthropic ~10.4k); one call per request.
SERVER_TOOL_PRIOR_TOKENS = 10_000
CALIBRATED_SHAPES_EXACT = frozenset({"server_tools", "images", "tools"})
ANY_MODEL = "*"


@dataclass(frozen=True, slots=True)
class Adjustment:
    prompt_tokens: int
    tool_calls: int  # server-side tool calls to reserve fees for
    calibrated: bool


def _key(model: str, tier: str, shape: str) -> str:
    return f"{model}|{tier}|{shape}"


def applies(tier: str, shape: str) -> bool:
    return tier != "exact" or shape in CALIBRATED_SHAPES_EXACT


class Calibrator:
    def __init__(self, half_life_secs: float = 7 * 86400, flush_secs: float = 2.0, max_keys: int = 1024,
                 enabled: bool = True) -> None:
        self.half_life = half_life_secs
        self.flush_secs = flush_secs
        self.max_keys = max_keys
        self.enabled = enabled
        self._view: dict[str, CalibrationSums] = {}  # shared sums as last read, plus what we saw since
        self._pending: dict[str, list[float]] = {}

    # ---- request path ---------------------------------------------------------------------------

    def adjust(self, model: str, tier: str, shape: str, tokens: int, server_tools: int) -> Adjustment:
        """The prompt tokens to reserve for, and server-tool calls to charge fees for."""
        if not self.enabled or not applies(tier, shape):
            return Adjustment(tokens, 0, False)
        s = self._view.get(_key(model, tier, shape))
        if s is None or s[3] < MIN_SAMPLES:
            s = self._view.get(_key(ANY_MODEL, tier, shape))
        if s is None or s[3] < MIN_SAMPLES or s[1] <= 0:
            if shape == "server_tools":
                return Adjustment(tokens + SERVER_TOOL_PRIOR_TOKENS * server_tools, server_tools, False)
            return Adjustment(tokens, 0, False)
        provider, ours, calls, n = s
        if shape == "server_tools":
            extra = min(EXTRA_MAX, max(0.0, (provider - ours) / n))
            return Adjustment(tokens + math.ceil(extra), max(server_tools, math.ceil(calls / n - 1e-9)), True)
        ratio = min(RATIO_MAX, max(RATIO_MIN, provider / ours))
        return Adjustment(math.ceil(tokens * ratio - 1e-6), 0, True)  # decayed float sums: no ceil of 800.0000001

    def observe(self, model: str, tier: str, shape: str, ours: int, provider: int, tool_calls: int) -> None:
        """One settled request with provider usage; `ours` is our raw count (before any adjustment)."""
        if not self.enabled or ours <= 0 or provider < 0:
            return
        for k in (_key(model, tier, shape), _key(ANY_MODEL, tier, shape)):
            if k not in self._view and len(self._view) >= self.max_keys:
                continue  # bounded: model labels are already bounded, this is the backstop
            p = self._pending.setdefault(k, [0.0, 0.0, 0.0, 0.0])
            p[0] += provider
            p[1] += ours
            p[2] += tool_calls
            p[3] += 1
            v = self._view.get(k, (0.0, 0.0, 0.0, 0.0))
            self._view[k] = (v[0] + provider, v[1] + ours, v[2] + tool_calls, v[3] + 1)

    # ---- background -----------------------------------------------------------------------------

    async def sync(self, ledger: Ledger | None, now: float | None = None) -> None:
        """Flush our samples to the shared store and take everyone's back."""
        if ledger is None:
            self._pending.clear()
            self._export()
            return
        deltas: dict[str, CalibrationSums] = {k: (v[0], v[1], v[2], v[3]) for k, v in self._pending.items()}
        self._pending = {}
        try:
            merged = await ledger.merge_calibration(deltas, time.time() if now is None else now, self.half_life)
        except StoreUnavailable:
            metrics.store_failures.labels("calibration").inc()
            for k, d in deltas.items():  # keep them for the next flush
                p = self._pending.setdefault(k, [0.0, 0.0, 0.0, 0.0])
                for i in range(4):
                    p[i] += d[i]
            return
        if len(merged) > self.max_keys:
            merged = dict(sorted(merged.items(), key=lambda kv: -kv[1][3])[: self.max_keys])
        for k, p in self._pending.items():  # samples that arrived while we were flushing
            m = merged.get(k, (0.0, 0.0, 0.0, 0.0))
            merged[k] = (m[0] + p[0], m[1] + p[1], m[2] + p[2], m[3] + p[3])
        self._view = merged
        self._export()

    async def run(self, ledger: Ledger | None) -> None:
        with_store = ledger is not None
        while True:
            try:
                await self.sync(ledger)
            except Exception:  # never let a store hiccup end the loop for the life of the process
                log.exception("calibration sync failed")
            await asyncio.sleep(self.flush_secs if with_store else 30)

    async def reset(self, ledger: Ledger | None) -> int:
        self._view.clear()
        self._pending.clear()
        n = await ledger.reset_calibration() if ledger is not None else 0
        self._export()
        return n

    # ---- visibility ----------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        rows = []
        for k, (provider, ours, calls, n) in sorted(self._view.items()):
            model, tier, shape = k.split("|")
            rows.append({"model": model, "tier": tier, "shape": shape, "samples": round(n, 3),
                         "ratio": round(provider / ours, 4) if ours > 0 else None,
                         "extra_tokens_per_request": round((provider - ours) / n, 1) if n > 0 else None,
                         "tool_calls_per_request": round(calls / n, 3) if n > 0 else None,
                         "applied": applies(tier, shape)})
        return rows

    def _export(self) -> None:
        per: dict[tuple[str, str], list[float]] = {}
        for k, (provider, ours, _, _) in self._view.items():
            model, tier, _shape = k.split("|")
            acc = per.setdefault((model, tier), [0.0, 0.0])
            acc[0] += provider
            acc[1] += ours
        for (model, tier), (provider, ours) in per.items():
            if ours > 0:
                metrics.estimate_ratio.labels(model, tier).set(provider / ours)
