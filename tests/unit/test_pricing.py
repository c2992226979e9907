from decimal import ROUND_CEILING, Decimal

import pytest
from genai_prices import Usage, calc_price

from nexus_extproc.metering.pricing import PriceBook
from nexus_extproc.metering.usage import TokenUsage
from tests.conftest import make_config


def reference_micros(model, provider, usage: TokenUsage) -> int:
    """Independent: genai-prices' own calculation, rounded up to the micro-dollar."""
    r = calc_price(Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                         cache_read_tokens=usage.cache_read_tokens, cache_write_tokens=usage.cache_write_tokens),
                   model_ref=model, provider_id=provider)
    return int((r.total_price * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


MODELS = [("gpt-4o", "openai"), ("gpt-4o-mini", "openai"), ("gpt-4-turbo", "openai"), ("gpt-5", "openai"),
          ("o3", "openai"), ("claude-3-5-haiku", "anthropic"), ("claude-sonnet-4-5", "anthropic")]
USAGES = [TokenUsage(1000, 100), TokenUsage(7, 3), TokenUsage(5000, 800, cache_read_tokens=2000),
          TokenUsage(3000, 50, cache_write_tokens=1000), TokenUsage(250_000, 1000, cache_read_tokens=10_000)]


# OpenAI has no cache-write price, so those combinations are not generated.
@pytest.mark.parametrize(("model", "provider", "usage"), [
    (m, p, u) for m, p in MODELS for u in USAGES if not (p == "openai" and u.cache_write_tokens)])
def test_cost_matches_genai_prices(model, provider, usage):
    book = PriceBook(make_config())
    assert book.resolve(provider, model).cost_micros(usage) == reference_micros(model, provider, usage)


def test_override_and_local_zero_price():
    book = PriceBook(make_config(prices={"gpt-4o": {"input_per_mtok": 1, "output_per_mtok": 2},
                                         "llama3.1:8b": {"input_per_mtok": 0, "output_per_mtok": 0}}))
    p = book.resolve("openai", "gpt-4o")
    assert p.source == "override" and p.estimate_micros(1_000_000, 1_000_000) == 3_000_000
    assert book.resolve("openai", "llama3.1:8b").estimate_micros(10_000, 10_000) == 0


def test_unknown_model_charges_fallback_never_free():
    book = PriceBook(make_config())
    p = book.resolve("openai", "totally-unknown-model")
    assert p.source == "fallback" and not p.known
    assert p.estimate_micros(1000, 1000) == 1000 * 15 + 1000 * 75


def test_unknown_model_rejected_when_configured():
    book = PriceBook(make_config(unpriced_model_action="reject"))
    assert book.resolve("openai", "totally-unknown-model").source == "unpriced"


def test_startup_check_lists_configured_models_without_price():
    cfg = make_config(equivalents={"gpt-4o-mini": "ollama/qwen-local"}, prices={})
    assert PriceBook(cfg).check_configured(cfg) == ["llama3.1:8b", "qwen-local"]


def test_model_cache_is_bounded():
    book = PriceBook(make_config())
    book._cache.limit = 3
    for i in range(10):
        assert book.resolve("openai", f"junk-{i}").source == "fallback"
        assert len(book._cache) <= 3
    assert book.resolve("openai", "gpt-4o-mini").known  # still resolves after the bound dropped the cache


def test_money_is_exact_integers():
    p = PriceBook(make_config()).resolve("openai", "gpt-4o-mini")
    total = sum(p.cost_micros(TokenUsage(7, 3)) for _ in range(1000))
    assert total == 1000 * int((Decimal(7) * Decimal("0.15") + 3 * Decimal("0.6")).to_integral_value(
        rounding=ROUND_CEILING))


def test_openai_compatible_backend_charges_its_own_price_provider():
    """`provider` is the API a backend speaks; `price_provider` is whose price list it bills by."""
    from nexus_extproc.config import ConfigError
    from nexus_extproc.metering.pricing import check_price_providers
    from nexus_extproc.request.router import Router
    from tests.conftest import BACKENDS

    groq = {"cluster": "groq", "type": "cloud", "provider": "openai", "price_provider": "groq",
            "models": ["llama-3.1-8b-instant"]}
    cfg = make_config(backends={**BACKENDS, "groq": groq})
    check_price_providers(cfg)
    route = Router(cfg).route("openai", "llama-3.1-8b-instant")
    assert (route.backend, route.api, route.price_provider) == ("groq", "openai", "groq")
    book = PriceBook(cfg)
    priced = book.resolve(route.price_provider, "llama-3.1-8b-instant")
    assert priced.known
    assert priced.cost_micros(TokenUsage(1000, 100)) == reference_micros("llama-3.1-8b-instant", "groq",
                                                                         TokenUsage(1000, 100))
    assert "llama-3.1-8b-instant" not in book.check_configured(cfg)  # priced by groq, not the fallback
    with pytest.raises(ConfigError, match=r"backends\.groq\.price_provider: 'nope'"):
        check_price_providers(make_config(backends={**BACKENDS, "groq": {**groq, "price_provider": "nope"}}))
