"""Price resolution and settlement arithmetic, with genai-prices as the price database and usage model.

A model is resolved once per (provider, model) into a `PricePlan`, compiled from genai-prices' own
`ModelPrice` with the library's own unit registry (which usage keys a price covers, which count is a subset
of which: cache reads of input, reasoning of output, web searches as a per-call fee). Per request only the
subtraction and multiplication remain.

Why not call `ModelPrice.calc_price` per request: it re-validates the price set and re-derives the unit
lattice on every call (~270 µs on this machine, several times our whole request path). The plan is built from
the same registry and checked against `ModelPrice.calc_price` on the recorded provider corpus and on random
usages (tests/unit/test_pricing.py), so a library upgrade that changes the convention fails a test.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, cast

from genai_prices import data_snapshot
from genai_prices.types import ModelPrice, Provider, TieredPrices, Usage, UsageExtractor
from genai_prices.types import _collect_resolved_model_prices as _library_resolved_prices
from genai_prices.units import _get_registry as _library_unit_registry

from nexus_extproc.config import ConfigError, NexusConfig, PriceOverride
from nexus_extproc.memo import BoundedMemo
from nexus_extproc.metering.money import ceil_micros
from nexus_extproc.metering.usage import TokenUsage

log = logging.getLogger(__name__)

PriceSource = Literal["override", "genai-prices", "fallback", "unpriced"]
UsageCounts = Mapping[str, int]



@dataclass(frozen=True, slots=True)
class _Unit:
    key: str  # genai-prices usage key, e.g. "cache_read_tokens", "web_searches", "requests"
    price: Decimal | TieredPrices
    per: int
    descendants: tuple[int, ...]  # indexes (into the plan) of the priced units that are subsets of this one


class PricePlan:
    """One model's prices as genai-prices defines them, compiled for per-request use.

    Leaf counting is genai-prices' `compute_leaf_values`: each priced unit pays for its count minus the counts
    of its priced sub-units (input minus cache reads and writes, cache writes minus the 1h ones, ...). A
    negative leaf (a provider reporting more cached tokens than input) is a ValueError there; here it is
    clamped to 0 so a malformed usage block can never raise on the settlement path, and the sub-unit is still
    charged in full, so clamping only ever charges more.
    """

    __slots__ = ("_tiered", "_units", "keys")

    def __init__(self, model_price: ModelPrice) -> None:
        registry = _library_unit_registry()
        resolved = _library_resolved_prices(model_price, registry)
        # genai-prices orders units most specific first so descendants are computed before their ancestors.
        ordered = sorted(resolved, key=lambda up: (-len(up[0].dimensions), up[0].usage_key))
        units: list[_Unit] = []
        for i, (unit, price) in enumerate(ordered):
            desc = tuple(j for j, (other, _) in enumerate(ordered)
                         if j != i and unit.dimensions.items() <= other.dimensions.items()
                         and unit.usage_key != "requests" and other.usage_key != "requests")
            assert all(j < i for j in desc), "descendants sort first"
            units.append(_Unit(unit.usage_key, price, unit.per, desc))
        self._units = tuple(units)
        self._tiered = any(isinstance(u.price, TieredPrices) for u in units)
        self.keys = frozenset(u.key for u in units)

    def cost_usd(self, usage: UsageCounts) -> Decimal:
        total_input = usage.get("input_tokens", 0) if self._tiered else 0
        leaves: list[int] = []
        total = Decimal(0)
        for u in self._units:
            if u.key == "requests":
                count = 1
            else:
                count = usage.get(u.key, 0)
                for j in u.descendants:
                    count -= leaves[j]
                count = max(count, 0)
            leaves.append(count)
            if not count:
                continue
            price = u.price
            if isinstance(price, TieredPrices):
                rate = price.base
                for tier in reversed(price.tiers):
                    if total_input > tier.start:
                        rate = tier.price
                        break
                price = rate
            total += price * count / u.per
        return total

    def cost_micros(self, usage: UsageCounts) -> int:
        return ceil_micros(self.cost_usd(usage) * 1_000_000)


def token_usage_counts(u: TokenUsage) -> dict[str, int]:
    """Our normalised usage in genai-prices' usage keys (input includes cache reads and writes)."""
    out = {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens}
    if u.cache_read_tokens:
        out["cache_read_tokens"] = u.cache_read_tokens
    if u.cache_write_tokens:
        out["cache_write_tokens"] = u.cache_write_tokens
    if u.reasoning_tokens:
        out["output_reasoning_tokens"] = u.reasoning_tokens
    if u.web_searches:
        out["web_searches"] = u.web_searches
    return out


def usage_counts(usage: Usage) -> dict[str, int]:
    """A genai-prices `Usage` as plain counts (only what the provider reported)."""
    out: dict[str, int] = {}
    for k, v in vars(usage).items():
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out[k] = v
        elif isinstance(v, (float, Decimal)) and v >= 0:
            out[k] = int(v)
    return out


@dataclass(frozen=True, slots=True)
class ResolvedPrice:
    model: str
    source: PriceSource
    plan: PricePlan

    @property
    def known(self) -> bool:
        """Configured or in the price database: the model may appear as a metric label."""
        return self.source in ("override", "genai-prices")

    def cost_micros(self, usage: TokenUsage | UsageCounts) -> int:
        counts = token_usage_counts(usage) if isinstance(usage, TokenUsage) else usage
        return self.plan.cost_micros(counts)

    def estimate_micros(self, prompt_tokens: int, output_tokens: int, web_searches: int = 0) -> int:
        counts = {"input_tokens": prompt_tokens, "output_tokens": output_tokens}
        if web_searches:
            counts["web_searches"] = web_searches
        return self.plan.cost_micros(counts)


def _override_plan(o: PriceOverride) -> PricePlan:
    kw: dict[str, Decimal] = {"input_mtok": o.input_per_mtok, "output_mtok": o.output_per_mtok}
    if o.cache_read_per_mtok is not None:
        kw["cache_read_mtok"] = o.cache_read_per_mtok
    if o.cache_write_per_mtok is not None:
        kw["cache_write_mtok"] = o.cache_write_per_mtok
    return PricePlan(ModelPrice(**kw))


_ZERO_PLAN: PricePlan | None = None


def _zero_plan() -> PricePlan:
    global _ZERO_PLAN
    if _ZERO_PLAN is None:
        _ZERO_PLAN = PricePlan(ModelPrice(input_mtok=Decimal(0), output_mtok=Decimal(0)))
    return _ZERO_PLAN


class UsageExtraction:
    """genai-prices' usage extractors, looked up once per (provider, API flavour).

    The extractor is called directly rather than through `genai_prices.extract_usage`, because that also
    resolves the answered model and raises for one it does not know (a local model behind an OpenAI-compatible
    API); which model is priced is decided by `PriceBook`.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], UsageExtractor | None] = {}

    def _extractor(self, provider_id: str, flavor: str) -> UsageExtractor | None:
        key = (provider_id, flavor)
        if key not in self._cache:
            found: UsageExtractor | None = None
            provider: Provider | None = next(
                (p for p in data_snapshot.get_snapshot().providers if p.id == provider_id), None)
            for e in (provider.extractors or []) if provider is not None else []:
                if e.api_flavor == flavor:
                    found = e
            self._cache[key] = found
        return self._cache[key]

    def leaf_paths(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, ...]]:
        """Every usage field the extractors of these (provider, API flavour) pairs read, as a path under their
        root: what Envoy must copy out of a JSON answer (its json_to_metadata filter copies leaf values, not
        objects) for that answer to be priced here as if the server had read it."""
        out: dict[tuple[str, ...], None] = {}
        for pair in pairs:
            ex = self._extractor(*pair)
            for m in ex.mappings if ex is not None else ():
                path = (m.path,) if isinstance(m.path, str) else tuple(m.path)
                if all(isinstance(step, str) for step in path):
                    out[cast(tuple[str, ...], path)] = None
        return list(out)

    def extract(self, provider_id: str, flavor: str, doc: Mapping[str, Any]) -> tuple[str | None, dict[str, int]]:
        """(answered model, usage counts); ValueError when the block lacks what the provider always sends."""
        ex = self._extractor(provider_id, flavor)
        if ex is None:
            raise ValueError(f"no usage extractor for {provider_id}/{flavor}")
        try:
            model, usage = ex.extract(doc)
        except (TypeError, KeyError) as e:  # malformed shapes: the extractor's own errors are ValueErrors
            raise ValueError(str(e)) from None
        return model, usage_counts(usage)


def check_price_providers(config: NexusConfig) -> None:
    """A `price_provider` the price database does not know would price every request at the fallback:
    refuse it at start-up, naming the key."""
    known = {p.id for p in data_snapshot.get_snapshot().providers}
    for name, b in config.backends.items():
        if b.price_provider is not None and b.price_provider not in known:
            raise ConfigError(f"backends.{name}.price_provider: {b.price_provider!r} is not a genai-prices "
                              f"provider (known: {', '.join(sorted(known))})")


class PriceBook:
    def __init__(self, config: NexusConfig) -> None:
        self._overrides = config.prices
        self._fallback = _override_plan(config.fallback_price)
        self._reject_unpriced = config.unpriced_model_action == "reject"
        # Model names come from clients and responses: bounded like every cache keyed by client input.
        self._cache: BoundedMemo[tuple[str, str], ResolvedPrice] = BoundedMemo()
        self._lock = threading.Lock()
        self.usage = UsageExtraction()

    def _lookup(self, provider: str, model: str) -> ResolvedPrice:
        if model in self._overrides:
            return ResolvedPrice(model, "override", _override_plan(self._overrides[model]))
        try:
            _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)
        except LookupError:
            info = None
        if info is not None:
            return ResolvedPrice(model, "genai-prices", PricePlan(info.get_prices(datetime.now(tz=UTC))))
        if self._reject_unpriced:
            return ResolvedPrice(model, "unpriced", _zero_plan())
        return ResolvedPrice(model, "fallback", self._fallback)

    def resolve(self, provider: str, model: str) -> ResolvedPrice:
        key = (provider, model)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        price = self._lookup(provider, model)
        with self._lock:
            return self._cache.put(key, price)

    def list_prices(self, provider: str, model: str) -> dict[str, int]:
        """Micro-dollars per 1M tokens by token type (input, cache_read, output), for exports: a cache read
        without its own price costs what an input token does."""
        plan = self.resolve(provider, model).plan
        m = 1_000_000
        cache = plan.cost_micros({"input_tokens": m, "cache_read_tokens": m}) if "cache_read_tokens" in plan.keys \
            else plan.cost_micros({"input_tokens": m})
        return {"input": plan.cost_micros({"input_tokens": m}), "cache_read": cache,
                "output": plan.cost_micros({"output_tokens": m})}

    def check_configured(self, config: NexusConfig) -> list[str]:
        """Start-up check (SPEC §2.3): configured models that fall to the fallback or would be rejected."""
        missing = []
        providers = {b.prices_from for b in config.backends.values()}
        for model in sorted(config.configured_models()):
            if not any(self.resolve(p, model).known for p in providers):
                missing.append(model)
        return missing
