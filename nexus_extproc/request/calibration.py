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
from typing import Any, NamedTuple

from nexus_extproc.ledger import Ledger, StoreUnavailable
from nexus_extproc.ledger.base import CalibrationSums
from nexus_extproc.ops import metrics

log = logging.getLogger(__name__)

RATIO_MIN, RATIO_MAX = 0.5, 4.0
EXTRA_MAX = 2_000_000
MIN_SAMPLES = 1.0
# Before any sample: what one server-side search feeds back, from the recorded exchanges (OpenAI web search
# ~9.3k input tokens, Anthropic ~10.4k); one call per request.
SERVER_TOOL_PRIOR_TOKENS = 10_000
CALIBRATED_SHAPES_EXACT = frozenset({"server_tools", "images", "tools"})
ANY_MODEL = "*"


class Adjustment(NamedTuple):
    """A NamedTuple: one is made per request, and it costs a fifth of a frozen dataclass."""

    prompt_tokens: int
    tool_calls: int  # server-side tool calls to reserve fees for
    calibrated: bool


def _key(model: str, tier: str, shape: str) -> str:
    return f"{model}|{tier}|{shape}"


def _kind(shape: str) -> str:
    """Shapes are "<api>:<kind>" (tool preambles differ between chat and Responses); the kind decides how."""
    return shape.rpartition(":")[2]


def applies(tier: str, shape: str) -> bool:
    return tier != "exact" or _kind(shape) in CALIBRATED_SHAPES_EXACT


_Sums = list[float]  # [provider, ours, tool_calls, samples], mutated in place on the request path


class Calibrator:
    def __init__(self, half_life_secs: float = 7 * 86400, flush_secs: float = 2.0, max_keys: int = 1024,
                 enabled: bool = True) -> None:
        self.half_life = half_life_secs
        self.flush_secs = flush_secs
        self.max_keys = max_keys
        self.enabled = enabled
        # Keyed by (model, tier, shape) tuples on the request path; "model|tier|shape" strings in the store.
        self._view: dict[tuple[str, str, str], _Sums] = {}  # what adjust reads: the shared sums as last synced
        self._pending: dict[tuple[str, str, str], _Sums] = {}

    # ---- request path ---------------------------------------------------------------------------

    def adjust(self, model: str, tier: str, shape: str, tokens: int, server_tools: int) -> Adjustment:
        """The prompt tokens to reserve for, and server-tool calls to charge fees for."""
        if not self.enabled or not applies(tier, shape):
            return Adjustment(tokens, 0, False)
        s = self._view.get((model, tier, shape))
        if s is None or s[3] < MIN_SAMPLES:
            s = self._view.get((ANY_MODEL, tier, shape))
        server = _kind(shape) == "server_tools"
        if s is None or s[3] < MIN_SAMPLES or s[1] <= 0:
            if server:
                return Adjustment(tokens + SERVER_TOOL_PRIOR_TOKENS * server_tools, server_tools, False)
            return Adjustment(tokens, 0, False)
        provider, ours, calls, n = s
        if server:
            extra = min(EXTRA_MAX, max(0.0, (provider - ours) / n))
            return Adjustment(tokens + math.ceil(extra), max(server_tools, math.ceil(calls / n - 1e-9)), True)
        ratio = min(RATIO_MAX, max(RATIO_MIN, provider / ours))
        return Adjustment(math.ceil(tokens * ratio - 1e-6), 0, True)  # float sums: no ceil of 800.0000001

    def observe(self, model: str, tier: str, shape: str, ours: int, provider: int, tool_calls: int) -> None:
        """One settled request with provider usage; `ours` is our raw count (before any adjustment). Only
        counted here; `sync` folds the samples into what `adjust` reads (and into the all-models keys)."""
        if not self.enabled or ours <= 0 or provider < 0:
            return
        k = (model, tier, shape)
        p = self._pending.get(k)
        if p is None:
            if len(self._pending) >= self.max_keys:
                return  # bounded: model labels are already bounded, this is the backstop
            p = self._pending[k] = [0.0, 0.0, 0.0, 0.0]
        p[0] += provider
        p[1] += ours
        p[2] += tool_calls
        p[3] += 1

    def _take_pending(self) -> dict[tuple[str, str, str], _Sums]:
        """This replica's samples since the last sync, with the all-models keys added up from them."""
        sent, self._pending = self._pending, {}
        out = dict(sent)
        for (_model, tier, shape), v in sent.items():
            a = out.setdefault((ANY_MODEL, tier, shape), [0.0, 0.0, 0.0, 0.0])
            for i in range(4):
                a[i] += v[i]
        return out

    # ---- background -----------------------------------------------------------------------------

    async def sync(self, ledger: Ledger | None, now: float | None = None) -> None:
        """Flush our samples to the shared store and take everyone's back (without a store: fold them in)."""
        sent = self._take_pending()
        if ledger is None:
            for k, d in sent.items():
                if k in self._view or len(self._view) < self.max_keys:
                    v = self._view.setdefault(k, [0.0, 0.0, 0.0, 0.0])
                    for i in range(4):
                        v[i] += d[i]
            self._export()
            return
        deltas: dict[str, CalibrationSums] = {_key(*k): (v[0], v[1], v[2], v[3]) for k, v in sent.items()}
        try:
            merged = await ledger.merge_calibration(deltas, time.time() if now is None else now, self.half_life)
        except StoreUnavailable:
            metrics.store_failures.labels("calibration").inc()
            for k, d in sent.items():  # keep them for the next flush (model keys only: ANY is re-derived)
                if k[0] != ANY_MODEL:
                    p = self._pending.setdefault(k, [0.0, 0.0, 0.0, 0.0])
                    for i in range(4):
                        p[i] += d[i]
            return
        if len(merged) > self.max_keys:
            merged = dict(sorted(merged.items(), key=lambda kv: -kv[1][3])[: self.max_keys])
        view: dict[tuple[str, str, str], _Sums] = {}
        for key, m in merged.items():
            parts = key.split("|")
            if len(parts) == 3:
                view[(parts[0], parts[1], parts[2])] = list(m)
        self._view = view
        self._export()

    async def run(self, ledger: Ledger | None) -> None:
        while True:
            try:
                with metrics.reconciler_duration.labels("CalibrationSync").time():
                    await self.sync(ledger)
            except Exception:  # never let a store hiccup end the loop for the life of the process
                log.exception("calibration sync failed")
            await asyncio.sleep(self.flush_secs)

    async def reset(self, ledger: Ledger | None) -> int:
        self._view.clear()
        self._pending.clear()
        n = await ledger.reset_calibration() if ledger is not None else 0
        self._export()
        return n

    # ---- visibility ----------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        rows = []
        for (model, tier, shape), (provider, ours, calls, n) in sorted(self._view.items()):
            rows.append({"model": model, "tier": tier, "shape": shape, "samples": round(n, 3),
                         "ratio": round(provider / ours, 4) if ours > 0 else None,
                         "extra_tokens_per_request": round((provider - ours) / n, 1) if n > 0 else None,
                         "tool_calls_per_request": round(calls / n, 3) if n > 0 else None,
                         "applied": applies(tier, shape)})
        return rows

    def _export(self) -> None:
        per: dict[tuple[str, str], list[float]] = {}
        for (model, tier, _shape), (provider, ours, _, _) in self._view.items():
            acc = per.setdefault((model, tier), [0.0, 0.0])
            acc[0] += provider
            acc[1] += ours
        for (model, tier), (provider, ours) in per.items():
            if ours > 0:
                metrics.estimate_ratio.labels(model, tier).set(provider / ours)
