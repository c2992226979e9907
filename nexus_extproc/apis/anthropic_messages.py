"""Anthropic `/v1/messages`: system, messages, tools; usage in `message_start` and `message_delta`."""

from __future__ import annotations

from typing import Any, ClassVar

from nexus_extproc.apis.base import (
    SERVER_TOOL_PREFIXES,
    ApiFamily,
    ParsedRequest,
    StreamEventInfo,
    Translator,
    has_images,
    model_of,
    openai_signs,
    opt_int,
    shape_kind,
    stream_flag,
    text_of,
    tools_extra,
)
from nexus_extproc.apis.errors import bad_request
from nexus_extproc.apis.usage import UsageReport, from_anthropic
from nexus_extproc.metering.tokenizers import PromptShape


class AnthropicMessages(Translator):
    api: ClassVar[str] = "anthropic_messages"
    family: ClassVar[ApiFamily] = "anthropic"
    path: ClassVar[str] = "/v1/messages"

    def parse(self, doc: dict[str, Any]) -> ParsedRequest:
        model = model_of(doc)
        wrong_api = openai_signs(doc)
        if wrong_api is not None:
            raise bad_request(wrong_api)
        if "max_tokens" not in doc:  # the real API refuses it too: "max_tokens: Field required"
            raise bad_request("max_tokens: Field required")
        messages = doc.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty array")
        values: list[list[str]] = []
        images = False
        system = doc.get("system")
        if system is not None:
            values.append(text_of(system))
        for m in messages:
            if not isinstance(m, dict):
                raise bad_request("each message must be an object")
            vals = [m["role"]] if isinstance(m.get("role"), str) else []
            vals.extend(text_of(m.get("content")))
            images = images or has_images(m.get("content"))
            values.append(vals)
        max_tokens = opt_int(doc, "max_tokens")
        tools = doc.get("tools")
        server = sum(1 for t in tools if isinstance(t, dict) and isinstance(t.get("type"), str)
                     and t["type"].startswith(SERVER_TOOL_PREFIXES)) if isinstance(tools, list) else 0
        thinking = doc.get("thinking")
        return ParsedRequest(
            doc=doc,
            model=model,
            stream=stream_flag(doc),
            max_output_tokens=max_tokens,
            shape=PromptShape(messages=values, extra=tools_extra(doc), server_tools=server,
                              kind=shape_kind(server, isinstance(thinking, dict) and thinking.get("type") ==
                                              "enabled", images, bool(tools))),
        )

    def response_usage(self, doc: dict[str, Any]) -> UsageReport | None:
        return from_anthropic(doc.get("usage"), doc.get("model"))

    def reported_events(self, model: Any, usage: Any, start_usage: Any) -> list[tuple[str | None, dict[str, Any]]]:
        """`message_start` carries the input side, `message_delta` the cumulative output: both, in order."""
        out: list[tuple[str | None, dict[str, Any]]] = []
        if isinstance(start_usage, dict):
            out.append(("message_start", {"type": "message_start", "message": {"model": model, "usage": start_usage}}))
        if isinstance(usage, dict):
            out.append(("message_delta", {"type": "message_delta", "usage": usage}))
        return out

    def stream_event(self, event: str | None, data: dict[str, Any]) -> StreamEventInfo:
        kind = data.get("type") or event
        info = StreamEventInfo()
        if kind == "message_start":
            msg = data.get("message")
            if isinstance(msg, dict):
                info.usage = from_anthropic(msg.get("usage"), msg.get("model"))
        elif kind == "message_delta":
            info.usage = from_anthropic(data.get("usage"))
            info.final = info.usage is not None and info.usage.output_tokens is not None
        elif kind == "content_block_delta":
            delta = data.get("delta")
            if isinstance(delta, dict):
                for key in ("text", "partial_json", "thinking"):
                    if isinstance(delta.get(key), str):
                        info.text = delta[key]
        return info

