"""Price resolution: config override, then genai-prices, then the unpriced-model policy.

genai-prices' `calc_price` costs ~110 µs a call, so each model is resolved once into its per-MTok rates and
the per-request arithmetic is done here on integers and Decimals. Prices per million tokens are exactly
micro-dollars per token, which keeps the arithmetic exact.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from genai_prices import Usage, calc_price
from genai_prices.types import TieredPrices

from nexus_extproc.config import NexusConfig, PriceOverride
from nexus_extproc.money import ceil_micros
from nexus_extproc.usage import TokenUsage

log = logging.getLogger(__name__)

Rate = Decimal | TieredPrices
PriceSource = Literal["override", "genai-prices", "fallback", "unpriced"]

_MAX_CACHED_MODELS = 4096


def _rate_at(rate: Rate | None, total_input: int) -> Decimal | None:
    """Tiered prices apply the reached tier's rate to all tokens (genai-prices' documented cliff model)."""
    if rate is None or isinstance(rate, Decimal):
        return rate
    price = rate.base
    for tier in rate.tiers:
        if total_input > tier.start:
            price = tier.price
    return price


@dataclass(frozen=True, slots=True)
class ResolvedPrice:
    model: str
    source: PriceSource
    input: Rate
    output: Rate
    cache_read: Rate | None = None
    cache_write: Rate | None = None

    @property
    def known(self) -> bool:
        """Configured or in the price database: the model may appear as a metric label."""
        return self.source in ("override", "genai-prices")

    def cost_micros(self, usage: TokenUsage) -> int:
        """Exact cost of `usage` (genai-prices conventions: input_tokens includes cache reads and writes)."""
        total_in = usage.input_tokens
        in_rate = _rate_at(self.input, total_in) or Decimal(0)
        read_rate = _rate_at(self.cache_read, total_in)
        write_rate = _rate_at(self.cache_write, total_in)
        out_rate = _rate_at(self.output, total_in) or Decimal(0)
        cached = usage.cache_read_tokens
        written = usage.cache_write_tokens
        uncached = max(0, total_in - cached - written)
        total = uncached * in_rate + out_rate * usage.output_tokens
        total += cached * (read_rate if read_rate is not None else in_rate)
        total += written * (write_rate if write_rate is not None else in_rate)
        return ceil_micros(total)

    def estimate_micros(self, prompt_tokens: int, output_tokens: int) -> int:
        return self.cost_micros(TokenUsage(input_tokens=prompt_tokens, output_tokens=output_tokens))


def _from_override(model: str, o: PriceOverride, source: PriceSource) -> ResolvedPrice:
    return ResolvedPrice(model, source, o.input_per_mtok, o.output_per_mtok, o.cache_read_per_mtok,
                         o.cache_write_per_mtok)


class PriceBook:
    def __init__(self, config: NexusConfig) -> None:
        self._overrides = config.prices
        self._fallback = config.fallback_price
        self._reject_unpriced = config.unpriced_model_action == "reject"
        self._cache: dict[tuple[str, str], ResolvedPrice] = {}
        self._lock = threading.Lock()

    def _lookup(self, provider: str, model: str) -> ResolvedPrice:
        if model in self._overrides:
            return _from_override(model, self._overrides[model], "override")
        try:
            mp = calc_price(Usage(input_tokens=1, output_tokens=1), model_ref=model, provider_id=provider).model_price
        except LookupError:
            mp = None
        if mp is not None:
            return ResolvedPrice(model, "genai-prices", getattr(mp, "input_mtok", None) or Decimal(0),
                                 getattr(mp, "output_mtok", None) or Decimal(0),
                                 getattr(mp, "cache_read_mtok", None), getattr(mp, "cache_write_mtok", None))
        if self._reject_unpriced:
            return ResolvedPrice(model, "unpriced", Decimal(0), Decimal(0))
        return _from_override(model, self._fallback, "fallback")

    def resolve(self, provider: str, model: str) -> ResolvedPrice:
        key = (provider, model)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        price = self._lookup(provider, model)
        with self._lock:
            # Model names come from clients: never let them grow the cache without bound.
            if len(self._cache) < _MAX_CACHED_MODELS or price.known:
                self._cache[key] = price
        return price

    def check_configured(self, config: NexusConfig) -> list[str]:
        """Start-up check (SPEC §2.3): configured models that fall to the fallback or would be rejected."""
        missing = []
        providers = {b.provider for b in config.backends.values()}
        for model in sorted(config.configured_models()):
            if not any(self.resolve(p, model).known for p in providers):
                missing.append(model)
        return missing
