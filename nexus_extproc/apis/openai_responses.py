"""OpenAI `/v1/responses`: `input` items and `instructions`; usage arrives in `response.completed`."""

from __future__ import annotations

from typing import Any, ClassVar

from nexus_extproc.apis.base import (
    ApiFamily,
    ParsedRequest,
    StreamEventInfo,
    Translator,
    has_images,
    model_of,
    openai_tools,
    opt_int,
    shape_kind,
    stream_flag,
    text_of,
)
from nexus_extproc.apis.errors import bad_request
from nexus_extproc.apis.usage import UsageReport, from_openai
from nexus_extproc.metering.tokenizers import PromptShape


class OpenAIResponses(Translator):
    api: ClassVar[str] = "openai_responses"
    family: ClassVar[ApiFamily] = "openai"
    path: ClassVar[str] = "/v1/responses"
    usage_flavor: ClassVar[str] = "responses"

    def parse(self, doc: dict[str, Any]) -> ParsedRequest:
        model = model_of(doc)
        raw = doc.get("input")
        messages: list[list[str]] = []
        images = False
        if isinstance(raw, str):
            messages.append(["user", raw])
        elif isinstance(raw, list):
            for item in raw:
                if isinstance(item, str):
                    messages.append(["user", item])
                elif isinstance(item, dict):
                    vals = [item["role"]] if isinstance(item.get("role"), str) else []
                    vals.extend(text_of(item.get("content")))
                    images = images or has_images(item.get("content"))
                    if isinstance(item.get("arguments"), str):
                        vals.append(item["arguments"])
                    if isinstance(item.get("output"), str):
                        vals.append(item["output"])
                    messages.append(vals)
                else:
                    raise bad_request("'input' items must be strings or objects")
        elif raw is not None:
            raise bad_request("'input' must be a string or an array")
        functions, server = openai_tools(doc, nested=False)
        if isinstance(doc.get("instructions"), str):
            messages.insert(0, ["system", doc["instructions"]])
        if not messages:
            raise bad_request("'input' is required")
        return ParsedRequest(
            doc=doc,
            model=model,
            stream=stream_flag(doc),
            max_output_tokens=opt_int(doc, "max_output_tokens"),
            shape=PromptShape(messages=messages, functions=functions, server_tools=server,
                              kind=shape_kind(server, isinstance(doc.get("reasoning"), dict), images,
                                              bool(functions))),
        )

    def response_usage(self, doc: dict[str, Any]) -> UsageReport | None:
        return from_openai(doc.get("usage"), doc.get("model"))

    def reported_events(self, model: Any, usage: Any, start_usage: Any) -> list[tuple[str | None, dict[str, Any]]]:
        if not isinstance(usage, dict):
            return []
        return [("response.completed", {"type": "response.completed", "response": {"usage": usage, "model": model}})]

    def stream_event(self, event: str | None, data: dict[str, Any]) -> StreamEventInfo:
        kind = data.get("type") or event
        info = StreamEventInfo()
        if kind == "response.output_text.delta" and isinstance(data.get("delta"), str):
            info.text = data["delta"]
        elif kind == "response.function_call_arguments.delta" and isinstance(data.get("delta"), str):
            info.text = data["delta"]
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            resp = data.get("response")
            if isinstance(resp, dict):
                info.usage = from_openai(resp.get("usage"), resp.get("model"))
                info.final = info.usage is not None and info.usage.complete
        return info

