"""OpenAI `/v1/chat/completions` (and OpenAI-compatible local servers such as Ollama and vLLM)."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from nexus_extproc.apis.base import (
    ApiFamily,
    ParsedRequest,
    StreamEventInfo,
    Translator,
    anthropic_signs,
    has_images,
    model_of,
    openai_tools,
    opt_int,
    shape_kind,
    stream_flag,
    stream_options_of,
    text_of,
)
from nexus_extproc.apis.errors import bad_request
from nexus_extproc.apis.usage import UsageReport, from_openai
from nexus_extproc.metering.tokenizers import PromptShape


class OpenAIChat(Translator):
    api: ClassVar[str] = "openai_chat"
    family: ClassVar[ApiFamily] = "openai"
    path: ClassVar[str] = "/v1/chat/completions"
    stream_usage_option: ClassVar[bool] = True
    usage_flavor: ClassVar[str] = "chat"

    def parse(self, doc: dict[str, Any]) -> ParsedRequest:
        model = model_of(doc)
        wrong_api = anthropic_signs(doc)
        if wrong_api is not None:
            raise bad_request(wrong_api)
        messages = doc.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty array")
        values: list[list[str]] = []
        names = 0
        images = False
        for m in messages:
            if not isinstance(m, dict):
                raise bad_request("each message must be an object")
            vals: list[str] = []
            role = m.get("role")
            if isinstance(role, str):
                vals.append(role)
            vals.extend(text_of(m.get("content")))
            images = images or has_images(m.get("content"))
            name = m.get("name")
            if isinstance(name, str):
                vals.append(name)
                names += 1
            calls = m.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    vals.append(json.dumps(call.get("function"), separators=(",", ":"), ensure_ascii=False))
            values.append(vals)
        functions, server = openai_tools(doc, nested=True)
        stream = stream_flag(doc)
        wants_usage = stream_options_of(doc)
        return ParsedRequest(
            doc=doc,
            model=model,
            stream=stream,
            max_output_tokens=opt_int(doc, "max_completion_tokens", "max_tokens"),
            shape=PromptShape(messages=values, names=names, functions=functions, server_tools=server,
                              kind=shape_kind(server, False, images, bool(functions))),
            client_wants_stream_usage=wants_usage,
        )

    def response_usage(self, doc: dict[str, Any]) -> UsageReport | None:
        return from_openai(doc.get("usage"), doc.get("model"))

    def reported_events(self, model: Any, usage: Any, start_usage: Any) -> list[tuple[str | None, dict[str, Any]]]:
        return [(None, {"choices": [], "usage": usage, "model": model})] if isinstance(usage, dict) else []

    def stream_event(self, event: str | None, data: dict[str, Any]) -> StreamEventInfo:
        info = StreamEventInfo()
        choices = data.get("choices")
        if isinstance(choices, list):
            parts = []
            for c in choices:
                if isinstance(c, dict):
                    delta = c.get("delta") or {}
                    if isinstance(delta, dict):
                        parts.extend(text_of(delta.get("content")))
                        for call in delta.get("tool_calls") or ():
                            fn = call.get("function") if isinstance(call, dict) else None
                            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                                parts.append(fn["arguments"])
                    t = c.get("text")  # legacy completions chunks
                    if isinstance(t, str):
                        parts.append(t)
            info.text = "".join(parts)
        u = data.get("usage")
        if isinstance(u, dict):
            info.usage = from_openai(u, data.get("model"))
            info.usage_only = not choices
            info.final = info.usage is not None and info.usage.complete
        return info
