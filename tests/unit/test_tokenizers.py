import pytest

from nexus_extproc.metering import tokenizers
from nexus_extproc.metering.tokenizers import PromptShape, TokenCounter, TokenizerLoadError, heuristic_tokens

# OpenAI's token-counting cookbook example, with the prompt_tokens the API reported for it.
COOKBOOK = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate "
                                  "jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase "
                                                               "revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to "
                                                          "touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how "
                                                               "to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
                                "deliverable."},
]


def shape_of(messages):
    return PromptShape(messages=[list(m.values()) for m in messages], names=sum("name" in m for m in messages))


@pytest.mark.parametrize(("model", "expected"), [
    ("gpt-3.5-turbo", 129), ("gpt-4", 129), ("gpt-4-turbo", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124),
])
def test_exact_chat_counts_match_openai_reported_prompt_tokens(counter, model, expected):
    tc = counter.count_prompt(model, shape_of(COOKBOOK))
    assert tc.tier == "exact"
    assert tc.tokens == expected


@pytest.mark.parametrize(("model", "tier", "encoding"), [
    ("gpt-4o-2024-08-06", "exact", "o200k_base"), ("gpt-4.1-mini", "exact", "o200k_base"),
    ("gpt-5", "exact", "o200k_base"), ("o3-mini", "exact", "o200k_base"), ("o1", "exact", "o200k_base"),
    ("gpt-4-turbo", "exact", "cl100k_base"), ("gpt-3.5-turbo", "exact", "cl100k_base"),
    ("text-embedding-3-small", "exact", "cl100k_base"), ("claude-sonnet-4-5", "approximation", "cl100k_base"),
    ("llama3.1:8b", "approximation", "cl100k_base"), ("mystery-model", "heuristic", None),
])
def test_tier_selection(model, tier, encoding):
    assert TokenCounter.tier_for(model) == (tier, encoding)


def test_heuristic_is_conservative_ceiling():
    assert heuristic_tokens(0) == 0
    assert heuristic_tokens(4) == 2  # 4/4*1.15 = 1.15 -> 2
    assert heuristic_tokens(400) == 115
    assert heuristic_tokens(401) == 116


def test_heuristic_counts_utf8_bytes(counter):
    tc = counter.count_prompt("unknown", PromptShape(messages=[["é" * 100]]))
    assert tc == tokenizers.TokenCount(heuristic_tokens(200), "heuristic")


def test_approximation_applies_factor(counter):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    base = len(counter.encodings["cl100k_base"].encode_ordinary(text))
    tc = counter.count_prompt("claude-3-5-haiku", PromptShape(messages=[[text]], chat_format=False))
    assert tc.tier == "approximation"
    assert tc.tokens == -(-base * 110 // 100)


def test_cache_returns_same_count_for_repeated_long_message(counter):
    long = "lorem ipsum dolor sit amet " * 200
    first = counter.count_prompt("gpt-4o", PromptShape(messages=[["user", long]]))
    second = counter.count_prompt("gpt-4o", PromptShape(messages=[["user", long], ["user", "next"]]))
    assert second.tokens == first.tokens + 3 + len(counter.encodings["o200k_base"].encode_ordinary("user")) + 1


def test_rank_file_hash_mismatch_is_a_startup_error(monkeypatch):
    monkeypatch.setattr(tokenizers, "_rank_file_bytes", lambda name: b"tampered")
    with pytest.raises(TokenizerLoadError, match="sha256"):
        tokenizers.load_encoding("cl100k_base")


@pytest.mark.parametrize(("model", "encoding", "reasoning"), [
    ("gpt-6.2-sol", "o200k_base", True),  # Codex's default, counted `heuristic` before issue 26
    ("gpt-7", "o200k_base", True), ("gpt-5.5", "o200k_base", True), ("gpt-5-codex", "o200k_base", True),
    ("o5-mini", "o200k_base", True), ("o3", "o200k_base", True), ("o1-mini", "o200k_base", False),
    ("gpt-4o-mini", "o200k_base", False), ("chatgpt-4o-latest", "o200k_base", False),
    ("gpt-4.1-nano", "o200k_base", False), ("gpt-4.5-preview", "o200k_base", False),
    ("gpt-4-turbo", "cl100k_base", False), ("gpt-3.5-turbo", "cl100k_base", False),
    ("ft:gpt-4o-mini:acme::abc123", "o200k_base", False), ("codex-mini-latest", "o200k_base", True),
    ("text-embedding-3-small", "cl100k_base", False),
])
def test_openai_families_by_rule(model, encoding, reasoning):
    from nexus_extproc.metering.tokenizers import TokenCounter, openai_family

    assert openai_family(model) == (encoding, reasoning)
    assert TokenCounter.tier_for(model) == ("exact", encoding)


@pytest.mark.parametrize("model", ["claude-sonnet-5", "claude-opus-4-5", "claude-haiku-5-0", "llama3.1:8b",
                                   "ollama/qwen3:32b"])
def test_other_families_are_approximations(model):
    from nexus_extproc.metering.tokenizers import TokenCounter

    assert TokenCounter.tier_for(model) == ("approximation", "cl100k_base")


@pytest.mark.parametrize("model", ["gpt-image-1", "omni-moderation-latest", "whisper-1", "some-new-model"])
def test_names_outside_the_rules_are_heuristic(model):
    from nexus_extproc.metering.tokenizers import TokenCounter

    assert TokenCounter.tier_for(model) == ("heuristic", None)
