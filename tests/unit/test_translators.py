import json

import pytest

from nexus_extproc.apis import TRANSLATORS, for_path
from nexus_extproc.apis.errors import NexusError

CHAT = TRANSLATORS["/v1/chat/completions"]
COMPL = TRANSLATORS["/v1/completions"]
RESP = TRANSLATORS["/v1/responses"]
EMB = TRANSLATORS["/v1/embeddings"]
ANTH = TRANSLATORS["/v1/messages"]


def test_path_lookup_ignores_query_and_trailing_slash():
    assert for_path("/v1/chat/completions?x=1") is CHAT
    assert for_path("/v1/messages/") is ANTH
    assert for_path("/v1/models") is None


def test_chat_parse_extracts_fields():
    p = CHAT.parse({"model": "gpt-4o", "max_completion_tokens": 50, "stream": True,
                    "messages": [{"role": "user", "name": "bob", "content": [{"type": "text", "text": "hi"},
                                                                            {"type": "image_url"}]}],
                    "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert p.model == "gpt-4o" and p.stream and p.max_output_tokens == 50
    assert p.shape.messages == [["user", "hi", "bob"]] and p.shape.names == 1
    assert [f.name for f in p.shape.functions] == ["f"] and not p.client_wants_stream_usage
    assert p.shape.kind == "images"


def test_chat_max_tokens_fallback_and_include_usage():
    p = CHAT.parse({"model": "m", "max_tokens": 7, "messages": [{"role": "user", "content": "x"}],
                    "stream_options": {"include_usage": True}})
    assert p.max_output_tokens == 7 and p.client_wants_stream_usage


@pytest.mark.parametrize("doc", [
    {"messages": [{"role": "user", "content": "x"}]},
    {"model": "", "messages": [{"role": "user", "content": "x"}]},
    {"model": 5, "messages": []},
    {"model": "gpt-4o", "messages": []},
    {"model": "gpt-4o", "messages": ["nope"]},
    {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
    {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
])
def test_chat_bad_requests_are_400(doc):
    with pytest.raises(NexusError) as e:
        CHAT.parse(doc)
    assert e.value.status == 400


def test_completions_prompt_forms():
    assert COMPL.parse({"model": "m", "prompt": ["a", "b"]}).shape.extra == ["a", "b"]
    assert COMPL.parse({"model": "m", "prompt": [1, 2, 3]}).token_ids == 3
    assert COMPL.parse({"model": "m", "prompt": [[1, 2], [3]]}).token_ids == 3
    with pytest.raises(NexusError):
        COMPL.parse({"model": "m", "prompt": {"x": 1}})


def test_responses_input_and_instructions():
    p = RESP.parse({"model": "gpt-4o", "instructions": "be brief", "input": "hello", "max_output_tokens": 9})
    assert p.shape.messages == [["system", "be brief"], ["user", "hello"]] and p.max_output_tokens == 9
    p = RESP.parse({"model": "gpt-4o", "input": [{"role": "user", "content": [{"type": "input_text",
                                                                                "text": "hey"}]}]})
    assert p.shape.messages == [["user", "hey"]]


def test_embeddings_never_stream_and_have_no_output():
    p = EMB.parse({"model": "text-embedding-3-small", "input": ["a", "b"]})
    assert not p.stream and p.max_output_tokens == 0 and p.shape.extra == ["a", "b"]


def test_anthropic_parse_system_blocks_and_tools():
    p = ANTH.parse({"model": "claude-sonnet-4-5", "max_tokens": 100, "system": [{"type": "text", "text": "sys"}],
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "q"},
                                                              {"type": "tool_result", "content": "r"}]}]})
    assert p.shape.messages == [["sys"], ["user", "q", "r"]] and p.max_output_tokens == 100


def test_openai_json_usage_with_cache_and_reasoning():
    u = CHAT.response_usage({"usage": {"prompt_tokens": 100, "completion_tokens": 20,
                                       "prompt_tokens_details": {"cached_tokens": 40},
                                       "completion_tokens_details": {"reasoning_tokens": 5}}})
    assert (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.reasoning_tokens) == (100, 20, 40, 5)


def test_anthropic_json_usage_adds_cache_to_input():
    u = ANTH.response_usage({"usage": {"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 50,
                                       "cache_creation_input_tokens": 7}})
    assert (u.input_tokens, u.cache_read_tokens, u.cache_write_tokens, u.output_tokens) == (67, 50, 7, 3)


def test_chat_stream_usage_chunk_is_usage_only():
    info = CHAT.stream_event(None, {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert info.usage_only and info.usage.input_tokens == 3
    info = CHAT.stream_event(None, {"choices": [{"delta": {"content": "hi"}}]})
    assert info.text == "hi" and info.usage is None


def test_anthropic_stream_events():
    s = ANTH.stream_event("message_start", {"type": "message_start", "message": {"usage": {
        "input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": 2}}})
    assert s.usage.input_tokens == 7 and s.usage.output_tokens == 1
    d = ANTH.stream_event("message_delta", {"type": "message_delta", "usage": {"output_tokens": 9}})
    assert d.usage.output_tokens == 9 and d.usage.input_tokens is None


def test_responses_stream_completed_carries_usage():
    e = RESP.stream_event("response.completed", {"type": "response.completed", "response": {
        "usage": {"input_tokens": 4, "output_tokens": 6}}})
    assert e.final and e.usage.output_tokens == 6


def test_rewrite_sets_model_and_stream_usage():
    body = CHAT.rewrite({"model": "a", "stream": True, "stream_options": {"x": 1}}, model="b",
                        add_stream_usage=True)
    doc = json.loads(body)
    assert doc["model"] == "b" and doc["stream_options"] == {"x": 1, "include_usage": True}


def test_the_error_family_comes_from_the_profiles_even_on_paths_they_do_not_serve():
    from nexus_extproc.apis import TRANSLATORS, family_for_path

    for path, t in TRANSLATORS.items():
        assert family_for_path(path) == t.family
        assert family_for_path(path + "?beta=true") == t.family
    assert family_for_path("/v1/messages/batches") == "anthropic"
    assert family_for_path("/v1/chat/completions/abc") == "openai"
    assert family_for_path("/v1/models") == "openai"


ANTHROPIC_BODIES = [
    {"model": "claude-sonnet-4-5", "max_tokens": 10, "system": "be brief",
     "messages": [{"role": "user", "content": "x"}]},
    {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
     "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}]},
    {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
]
OPENAI_BODIES = [
    {"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "x"},
                                                       {"role": "tool", "tool_call_id": "t", "content": "y"}]},
    {"model": "gpt-4o", "max_completion_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
    {"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
     "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]},
]


@pytest.mark.parametrize("doc", ANTHROPIC_BODIES)
def test_an_anthropic_body_on_the_chat_path_is_refused_naming_its_path(doc):
    with pytest.raises(NexusError) as e:
        CHAT.parse(doc)
    assert e.value.status == 400 and "/v1/messages" in e.value.message
    assert ANTH.parse(doc).model == "claude-sonnet-4-5"  # and it is fine where it belongs


@pytest.mark.parametrize("doc", OPENAI_BODIES)
def test_an_openai_body_on_the_messages_path_is_refused_naming_its_path(doc):
    with pytest.raises(NexusError) as e:
        ANTH.parse({**doc, "max_tokens": 10})
    assert e.value.status == 400 and "/v1/chat/completions" in e.value.message
    assert CHAT.parse(doc).model == "gpt-4o"


def test_an_anthropic_request_needs_max_tokens_as_the_real_api_says():
    with pytest.raises(NexusError) as e:
        ANTH.parse({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "x"}]})
    assert e.value.status == 400 and e.value.message == "max_tokens: Field required"
