"""Cost truth on real provider traffic (issue 12), in-process: every recorded exchange through the processor's
phases settles to genai-prices' own price, and each convention the old code missed has its own test."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import ROUND_CEILING
from typing import Any

import pytest
from genai_prices import Usage, calc_price, data_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_extproc.app import build
from nexus_extproc.metering.pricing import PricePlan
from nexus_extproc.request.pipeline import RequestState
from tests.conftest import make_config
from tests.corpus import case_params, expected_micros


@pytest.fixture(scope="module")
def processor(counter):
    return build(make_config(), counter).processor


def chunks_of(body: bytes, n: int) -> list[bytes]:
    step = max(1, len(body) // n)
    return [body[i:i + step] for i in range(0, len(body), step)] or [b""]


async def replay(processor, path: str, request: dict[str, Any], status: int, ctype: str, body: bytes,
                 pieces: int = 3) -> RequestState:
    s = RequestState()
    processor.request_headers(s, {":method": "POST", ":path": path, "content-type": "application/json"}, False)
    reply = await processor.request_body(s, json.dumps(request).encode())
    assert reply.immediate is None, reply.immediate
    processor.response_headers(s, {":status": str(status), "content-type": ctype})
    parts = chunks_of(body, pieces) if s.streaming else [body]
    for i, c in enumerate(parts):
        processor.response_body(s, c, i == len(parts) - 1)
    return s


@pytest.mark.parametrize("case", case_params())
async def test_recorded_exchange_settles_to_the_micro_dollar(processor, case):
    s = await replay(processor, case["path"], case["request"], case["response_status"],
                     case["response_content_type"], case["response_body"].encode())
    cost, source = processor.compute_final_cost(s)
    assert source == "usage"
    assert cost == expected_micros(case)


# ---- one test per convention the hand-written usage code missed ----------------------------------------

def micros(total) -> int:
    return int((total * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


async def test_anthropic_web_search_requests_are_charged(processor):
    usage = {"input_tokens": 1000, "output_tokens": 100, "server_tool_use": {"web_search_requests": 3}}
    s = await replay(processor, "/v1/messages",
                     {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]},
                     200, "application/json",
                     json.dumps({"model": "claude-sonnet-4-5", "usage": usage}).encode())
    cost, _ = processor.compute_final_cost(s)
    tokens_only = micros(calc_price(Usage(input_tokens=1000, output_tokens=100), "claude-sonnet-4-5",
                                    provider_id="anthropic").total_price)
    assert cost == tokens_only + 30_000  # $10 per 1,000 searches


async def test_anthropic_stream_merges_message_start_and_delta_including_searches(processor):
    events = [
        ("message_start", {"type": "message_start", "message": {
            "model": "claude-sonnet-4-5", "usage": {"input_tokens": 50, "cache_read_input_tokens": 1000,
                                                    "cache_creation_input_tokens": 200, "output_tokens": 1}}}),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 70,
                                                              "server_tool_use": {"web_search_requests": 2}}}),
    ]
    body = "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events).encode()
    s = await replay(processor, "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": True,
                                                 "messages": [{"role": "user", "content": "x"}]},
                     200, "text/event-stream", body, pieces=5)
    cost, source = processor.compute_final_cost(s)
    want = calc_price(Usage(input_tokens=1250, cache_read_tokens=1000, cache_write_tokens=200, output_tokens=70,
                            web_searches=2), "claude-sonnet-4-5", provider_id="anthropic").total_price
    assert (source, cost) == ("usage", micros(want))


async def test_the_model_that_answered_is_priced(processor):
    doc = {"model": "gpt-4o-2024-05-13", "usage": {"prompt_tokens": 10_000, "completion_tokens": 1_000}}
    s = await replay(processor, "/v1/chat/completions",
                     {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 200,
                     "application/json", json.dumps(doc).encode())
    cost, _ = processor.compute_final_cost(s)
    snapshot = micros(calc_price(Usage(input_tokens=10_000, output_tokens=1_000), "gpt-4o-2024-05-13",
                                 provider_id="openai").total_price)
    alias = micros(calc_price(Usage(input_tokens=10_000, output_tokens=1_000), "gpt-4o",
                              provider_id="openai").total_price)
    assert snapshot != alias and cost == snapshot
    assert s.priced_model == "gpt-4o-2024-05-13"


async def test_an_unknown_answered_model_keeps_the_requested_price(processor):
    doc = {"model": "gpt-4o-some-future-build-xyz", "usage": {"prompt_tokens": 100, "completion_tokens": 10}}
    s = await replay(processor, "/v1/chat/completions",
                     {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, 200,
                     "application/json", json.dumps(doc).encode())
    cost, _ = processor.compute_final_cost(s)
    assert cost == micros(calc_price(Usage(input_tokens=100, output_tokens=10), "gpt-4o-mini",
                                     provider_id="openai").total_price)


@pytest.mark.parametrize(("path", "usage"), [
    ("/v1/chat/completions", {"prompt_tokens": 5000, "completion_tokens": 10,
                              "prompt_tokens_details": {"cache_write_tokens": 4000}}),
    ("/v1/responses", {"input_tokens": 5000, "output_tokens": 10,
                       "input_tokens_details": {"cache_write_tokens": 4000}}),
])
async def test_openai_cache_writes_are_priced_as_cache_writes(processor, path, usage):
    model = "gpt-5.6-sol"
    req = ({"model": model, "messages": [{"role": "user", "content": "hi"}]} if "chat" in path
           else {"model": model, "input": "hi"})
    s = await replay(processor, path, req, 200, "application/json", json.dumps({"model": model,
                                                                                "usage": usage}).encode())
    cost, _ = processor.compute_final_cost(s)
    want = micros(calc_price(Usage(input_tokens=5000, cache_write_tokens=4000, output_tokens=10), model,
                             provider_id="openai").total_price)
    plain = micros(calc_price(Usage(input_tokens=5000, output_tokens=10), model, provider_id="openai").total_price)
    assert want != plain and cost == want


async def test_malformed_usage_block_never_raises(processor):
    doc = {"model": 7, "usage": {"prompt_tokens": 10, "completion_tokens": 2,
                                 "prompt_tokens_details": {"cached_tokens": 99}}}  # more cached than input
    s = await replay(processor, "/v1/chat/completions",
                     {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 200,
                     "application/json", json.dumps(doc).encode())
    cost, source = processor.compute_final_cost(s)
    assert source == "usage" and cost > 0


# ---- the compiled plan is genai-prices' own calculation -------------------------------------------------

def _models() -> list[tuple[str, Any]]:
    out = []
    now = datetime.now(tz=UTC)
    for p in data_snapshot.get_snapshot().providers:
        if p.id in ("openai", "anthropic"):
            out += [(f"{p.id}/{m.id}", m.get_prices(now)) for m in p.models]
    return out


MODELS = _models()
KEYS = ["input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "cache_write_1h_tokens",
        "output_reasoning_tokens", "web_searches", "input_audio_tokens"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MODELS), st.integers(0, 400_000), st.integers(0, 50_000), st.floats(0, 1), st.floats(0, 1),
       st.floats(0, 1), st.integers(0, 5))
def test_plan_equals_library_calc_price(model, inp, out, read_f, write_f, reason_f, searches):
    _, mp = model
    read = int(inp * read_f)
    write = int((inp - read) * write_f)
    usage = {"input_tokens": inp, "output_tokens": out, "cache_read_tokens": read, "cache_write_tokens": write,
             "cache_write_1h_tokens": write // 2, "output_reasoning_tokens": int(out * reason_f),
             "web_searches": searches}
    assert PricePlan(mp).cost_usd(usage) == mp.calc_price(Usage(**usage))["total_price"]


# ---- the exact tier on the recorded ground truth ----------------------------------------------------

def _count(counter, case):
    from nexus_extproc.apis import for_path

    p = for_path(case["path"]).parse(case["request"])
    return counter.count_prompt(p.model, p.shape).tokens + p.token_ids


@pytest.mark.parametrize("case", case_params())
def test_exact_tier_equals_openai_prompt_tokens(counter, case):
    from tests.corpus import is_plain_text_openai, provider_prompt_tokens

    if not is_plain_text_openai(case):
        pytest.skip("not a plain-text OpenAI case")
    ours, theirs = _count(counter, case), provider_prompt_tokens(case)
    if case["request"]["model"].startswith("o1"):
        assert theirs - ours == 7  # the one known miss: no published formula gives o1-mini's count
    else:
        assert ours == theirs


@pytest.mark.parametrize("case", case_params())
def test_chat_tool_definitions_counted_within_a_few_tokens(counter, case):
    from tests.corpus import provider_prompt_tokens

    if case["api"] != "openai_chat" or not case["request"].get("tools"):
        pytest.skip("not a chat request with tools")
    assert abs(_count(counter, case) - provider_prompt_tokens(case)) <= 0.08 * provider_prompt_tokens(case)
