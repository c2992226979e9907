"""The one small interface every provider API implements.

A translator sees plain dicts and bytes, never protobuf: it says what a request asks for (model, prompt
shape, output cap, stream) and what a response reports (usage, streamed text). Everything about budgets
and routing lives elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from nexus_extproc.apis.errors import bad_request
from nexus_extproc.apis.usage import UsageReport
from nexus_extproc.metering.tokenizers import FunctionDef, PromptShape

ApiFamily = Literal["openai", "anthropic"]


@dataclass(slots=True)
class ParsedRequest:
    doc: dict[str, Any]
    model: str | None
    stream: bool
    max_output_tokens: int | None
    shape: PromptShape
    # OpenAI chat/completions streams carry usage only when the client asked for it.
    client_wants_stream_usage: bool = True
    token_ids: int = 0  # prompts given as token-id arrays are counted by length, exactly


@dataclass(slots=True)
class StreamEventInfo:
    usage: UsageReport | None = None
    text: str = ""
    # A chunk carrying only usage that the client did not ask for: dropped from what the client receives.
    usage_only: bool = False
    # The provider's final, cumulative usage for the response (not a partial count such as Anthropic's
    # message_start): only then is the settlement "usage" rather than "estimated".
    final: bool = False


def _block_types(doc: dict[str, Any]) -> set[str]:
    """The `type` of every content block in every message (both APIs put parts in `content` arrays)."""
    out: set[str] = set()
    messages = doc.get("messages")
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and isinstance(part.get("type"), str):
                out.add(part["type"])
    return out


def _tool_keys(doc: dict[str, Any]) -> set[str]:
    tools = doc.get("tools")
    return {k for t in tools if isinstance(t, dict) for k in t} if isinstance(tools, list) else set()


def anthropic_signs(doc: dict[str, Any]) -> str | None:
    """What marks a body as Anthropic Messages, never valid in OpenAI chat (whose API refuses each of them):
    sent to the wrong path it would be forwarded at a fallback price and fail upstream."""
    if "system" in doc:
        return "'system' is a top-level field of Anthropic's Messages API (/v1/messages)"
    if "stop_sequences" in doc:
        return "'stop_sequences' belongs to Anthropic's Messages API (/v1/messages)"
    if "input_schema" in _tool_keys(doc):
        return "tools with 'input_schema' belong to Anthropic's Messages API (/v1/messages)"
    foreign = _block_types(doc) & {"tool_use", "tool_result", "document", "thinking", "redacted_thinking"}
    if foreign:
        return f"content blocks of type {sorted(foreign)[0]!r} belong to Anthropic's Messages API (/v1/messages)"
    return None


def openai_signs(doc: dict[str, Any]) -> str | None:
    """What marks a body as OpenAI chat, never valid in Anthropic Messages (whose API refuses each of them)."""
    messages = doc.get("messages")
    roles = {m.get("role") for m in messages if isinstance(m, dict)} if isinstance(messages, list) else set()
    # Not "system": Anthropic answers 200 to a system-role message (a recorded exchange does it).
    wrong = sorted(r for r in roles & {"tool", "function"} if isinstance(r, str))
    if wrong:
        return f"a message with role {wrong[0]!r} belongs to OpenAI's chat API (/v1/chat/completions)"
    for key in ("max_completion_tokens", "response_format", "stream_options", "functions", "n", "logprobs"):
        if key in doc:
            return f"{key!r} belongs to OpenAI's chat API (/v1/chat/completions)"
    if "function" in _tool_keys(doc):
        return "tools with 'function' belong to OpenAI's chat API (/v1/chat/completions)"
    foreign = _block_types(doc) & {"image_url", "input_audio", "file"}
    if foreign:
        return f"content parts of type {sorted(foreign)[0]!r} belong to OpenAI's chat API (/v1/chat/completions)"
    return None


class Translator:
    api: ClassVar[str]
    family: ClassVar[ApiFamily]
    path: ClassVar[str]
    default_max_output: ClassVar[int | None] = None
    # Streams of this API report usage only when `stream_options.include_usage` is set.
    stream_usage_option: ClassVar[bool] = False
    # genai-prices' usage extractor for this API: provider id `family`, this api_flavor.
    usage_flavor: ClassVar[str] = "default"

    def parse(self, doc: dict[str, Any]) -> ParsedRequest:
        raise NotImplementedError

    def response_usage(self, doc: dict[str, Any]) -> UsageReport | None:
        raise NotImplementedError

    def stream_event(self, event: str | None, data: dict[str, Any]) -> StreamEventInfo:
        raise NotImplementedError

    def reported_events(self, model: Any, usage: Any, start_usage: Any) -> list[tuple[str | None, dict[str, Any]]]:
        """A stream's usage as Envoy's sse_to_metadata filter reported it (the last `usage` object seen, the first
        `message.usage`, the answered model), rebuilt as the events `stream_event` reads, so the settlement reads
        them exactly as it reads the stream itself. Empty: this API's streams are not settled from Envoy."""
        return []

    def rewrite(self, doc: dict[str, Any], *, model: str | None, add_stream_usage: bool) -> bytes:
        """The request body after a reroute (new `model`) and/or with stream usage requested."""
        out = dict(doc)
        if model is not None:
            out["model"] = model
        if add_stream_usage:
            opts = out.get("stream_options")
            opts = dict(opts) if isinstance(opts, dict) else {}  # parse refused any other type
            opts["include_usage"] = True
            out["stream_options"] = opts
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()


def stream_options_of(doc: dict[str, Any]) -> bool:
    """Whether the client asked for stream usage itself; `stream_options` of another type than an object is
    refused here, as the provider would, rather than failing when the body is rewritten."""
    opts = doc.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object")
    return opts.get("include_usage") is True


def text_of(content: Any) -> list[str]:
    """Text values of a content field: a string, or a list of parts with `text` (images are not counted)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                t = part.get("text")
                if isinstance(t, str):
                    out.append(t)
                elif part.get("type") in ("tool_use", "function_call"):
                    out.append(json.dumps(part.get("input", part.get("arguments")), separators=(",", ":")))
                elif part.get("type") == "tool_result":
                    out.extend(text_of(part.get("content")))
    return out


def opt_int(doc: dict[str, Any], *keys: str) -> int | None:
    for k in keys:
        v = doc.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad_request(f"'{k}' must be a non-negative integer")
        return v
    return None


def model_of(doc: dict[str, Any]) -> str:
    m = doc.get("model")
    if not isinstance(m, str) or not m.strip():
        raise bad_request("'model' is required and must be a non-empty string")
    if len(m) > 256:
        raise bad_request("'model' is too long")
    return m


def stream_flag(doc: dict[str, Any]) -> bool:
    v = doc.get("stream", False)
    if not isinstance(v, bool):
        raise bad_request("'stream' must be a boolean")
    return v


def tools_extra(doc: dict[str, Any]) -> list[str]:
    """Tool definitions as one JSON text: for APIs whose tool format we cannot count exactly (Anthropic adds
    a tool-use system prompt of its own; calibration learns that part)."""
    tools = doc.get("tools")
    if not tools:
        return []
    return [json.dumps(tools, separators=(",", ":"), ensure_ascii=False)]


# Tools that run on the provider's side and bill per call (and feed their results back in as input tokens).
SERVER_TOOL_PREFIXES = ("web_search", "code_interpreter", "code_execution", "file_search", "web_fetch")


def _function_def(name: Any, description: Any, params: Any) -> FunctionDef | None:
    if not isinstance(name, str):
        return None
    props: list[tuple[str, str, str, list[str]]] = []
    raw = params.get("properties") if isinstance(params, dict) else None
    if isinstance(raw, dict):
        for key, spec in raw.items():
            spec = spec if isinstance(spec, dict) else {}
            typ = spec.get("type")
            typ = typ if isinstance(typ, str) else ",".join(t for t in typ if isinstance(t, str)) \
                if isinstance(typ, list) else ""
            desc = spec.get("description")
            enum = spec.get("enum")
            props.append((str(key), typ, desc if isinstance(desc, str) else "",
                          [str(e) for e in enum] if isinstance(enum, list) else []))
    return FunctionDef(name, description if isinstance(description, str) else "", props)


def openai_tools(doc: dict[str, Any], nested: bool) -> tuple[list[FunctionDef], int]:
    """Function definitions (chat nests them under `function`; Responses does not) and the number of
    server-side tools enabled."""
    functions: list[FunctionDef] = []
    server = 0
    tools = doc.get("tools")
    for t in tools if isinstance(tools, list) else ():
        if not isinstance(t, dict):
            continue
        kind = t.get("type")
        if kind == "function":
            fn = t.get("function") if nested else t
            if isinstance(fn, dict):
                f = _function_def(fn.get("name"), fn.get("description"), fn.get("parameters"))
                if f is not None:
                    functions.append(f)
        elif isinstance(kind, str) and kind.startswith(SERVER_TOOL_PREFIXES):
            server += 1
    legacy = doc.get("functions")
    for fn in legacy if isinstance(legacy, list) else ():
        if isinstance(fn, dict):
            f = _function_def(fn.get("name"), fn.get("description"), fn.get("parameters"))
            if f is not None:
                functions.append(f)
    return functions, server


def has_images(content: Any) -> bool:
    return isinstance(content, list) and any(
        isinstance(p, dict) and p.get("type") in ("image_url", "input_image", "image", "input_file", "document")
        for p in content)


def shape_kind(server_tools: int, thinking: bool, images: bool, tools: bool) -> str:
    if server_tools:
        return "server_tools"
    if thinking:
        return "thinking"
    if images:
        return "images"
    return "tools" if tools else "plain"
