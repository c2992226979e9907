"""Garbage request bodies, shared by the gRPC component test and the fault suite's run through Envoy."""

from __future__ import annotations

import json
import random

PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages", "/v1/responses"]
FIELDS = ["model", "messages", "prompt", "input", "stream", "stream_options", "max_tokens", "tools", "tool_choice",
          "system", "n", "max_output_tokens", "max_completion_tokens", "reasoning", "thinking", "metadata"]
ODD: list[object] = [None, True, 7, -1, 1e308, "x", "", [], {}, [None], [5], [{"role": 5}], {"a": [1]},
                     "\ud800", [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": 7}]}],
                     [{"role": "assistant", "tool_calls": 5}], [{"type": "web_search"}], 2**70]


def garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 400))  # not JSON, not UTF-8
    if kind == 1:
        depth = rng.choice([100, 1000, 10_000, 50_000])
        return b"[" * depth + b"]" * depth if rng.random() < 0.5 else b'{"a":' * depth + b"1" + b"}" * depth
    if kind == 2:
        whole = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi" * 50}]}).encode()
        return whole[: rng.randrange(1, len(whole))]  # truncated
    if kind == 3:
        return json.dumps(rng.choice(ODD)).encode()  # valid JSON, not an object
    doc: dict[str, object] = {"model": rng.choice(["gpt-4o", "claude-3-5-sonnet-latest", "no-such-model", 5, None])}
    base = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi"}
    doc.update({k: v for k, v in base.items() if rng.random() < 0.7})
    for f in rng.sample(FIELDS, rng.randrange(1, 5)):
        doc[f] = rng.choice(ODD)
    if kind == 4:
        doc["stream"] = True
    text = json.dumps(doc)
    if kind == 5:
        text = text.replace('"hi"', '"\\ud83d"', 1)  # a lone surrogate escape
    return text.encode()
