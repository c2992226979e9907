"""Recorded-shape streams through the processor's response path: any chunking gives the same usage and cost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_extproc.app import build
from nexus_extproc.metering.usage import TokenUsage
from nexus_extproc.request.pipeline import RequestState
from tests.builders import admitted_state
from tests.conftest import make_config

FIX = Path(__file__).resolve().parent.parent / "fixtures"

# fixture -> (path, model, provider, expected usage in genai-prices conventions)
CASES = {
    "openai_chat_usage.sse": ("/v1/chat/completions", "o3", "openai",
                              TokenUsage(1200, 340, cache_read_tokens=1024, reasoning_tokens=256)),
    "openai_completions_usage.sse": ("/v1/completions", "gpt-3.5-turbo-instruct", "openai", TokenUsage(5, 2)),
    "openai_responses.sse": ("/v1/responses", "gpt-4.1", "openai", TokenUsage(2100, 2, cache_read_tokens=2048)),
    "anthropic_messages_cache.sse": ("/v1/messages", "claude-sonnet-4-5", "anthropic",
                                     TokenUsage(4525, 15, cache_read_tokens=3000, cache_write_tokens=1500)),
}


@pytest.fixture(scope="module")
def processor(counter):
    return build(make_config(), counter).processor


def run_stream(processor, name: str, chunks: list[bytes]) -> RequestState:
    path, model, _, _ = CASES[name]
    st_ = asyncio.run(admitted_state(processor, path, model))
    for i, c in enumerate(chunks):
        processor.response_body(st_, c, i == len(chunks) - 1)
    return st_


@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_stream_usage_and_cost(processor, name):
    raw = (FIX / name).read_bytes()
    st_ = run_stream(processor, name, [raw])
    want = CASES[name][3]
    assert st_.usage_final
    assert st_.usage.to_usage() == want
    cost, source = processor.compute_final_cost(st_)
    assert source == "usage" and cost == st_.price.cost_micros(want)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_byte_boundary_gives_same_usage(processor, name):
    raw = (FIX / name).read_bytes()
    want = CASES[name][3]
    for i in range(1, len(raw)):
        st_ = run_stream(processor, name, [raw[:i], raw[i:]])
        assert st_.usage.to_usage() == want and st_.usage_final, i


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(CASES)), data=st.data())
def test_random_chunkings_give_same_usage(processor, name, data):
    raw = (FIX / name).read_bytes()
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(raw) - 1), max_size=20))))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    st_ = run_stream(processor, name, chunks)
    assert st_.usage.to_usage() == CASES[name][3]


@settings(max_examples=100, deadline=None)
@given(junk=st.lists(st.binary(max_size=80), max_size=8))
def test_junk_stream_never_raises_and_settles_estimated(processor, junk):
    st_ = run_stream(processor, "openai_chat_usage.sse", [*junk, b""])
    cost, source = processor.compute_final_cost(st_)
    assert source == "estimated" and cost >= 0


def test_truncated_anthropic_stream_is_estimated_not_message_start_usage(processor):
    raw = (FIX / "anthropic_messages_cache.sse").read_bytes()
    cut = raw.index(b"event: message_delta")
    st_ = run_stream(processor, "anthropic_messages_cache.sse", [raw[:cut]])
    cost, source = processor.compute_final_cost(st_)
    assert source == "estimated"
    # Input (with cache parts) from message_start is kept; output is counted from the streamed text.
    assert st_.usage.input_tokens == 4525 and st_.out_text == ["Grüße", " aus Köln"]
    assert cost > st_.price.cost_micros(TokenUsage(4525, 1, cache_read_tokens=3000, cache_write_tokens=1500))


def test_usage_chunk_removed_only_when_filter_added_it(processor):
    raw = (FIX / "openai_chat_usage.sse").read_bytes()
    st_ = asyncio.run(admitted_state(processor, "/v1/chat/completions", "o3"))
    assert st_.added_stream_usage  # the filter asked for usage: the client did not
    out = b""
    for i in range(0, len(raw), 50):  # the client sees whole events only, and never the usage chunk
        r = processor.response_body(st_, raw[i:i + 50], i + 50 >= len(raw))
        out += raw[i:i + 50] if r.body is None else r.body
    assert b'"usage":{"prompt_tokens"' not in out and out.endswith(b"data: [DONE]\n\n")
    assert out == raw.replace(raw[raw.index(b'data: {"id":"chatcmpl-B9","object":"chat.completion.chunk",'
                                            b'"created":1727000000,"model":"o3-2025-04-16","system_fingerprint":'
                                            b'"fp_1","choices":[],'):raw.index(b"data: [DONE]")], b"")
    assert st_.usage.input_tokens == 1200
