"""OpenAI legacy `/v1/completions`: a prompt string (or token ids) instead of chat messages."""

from __future__ import annotations

from typing import Any, ClassVar

from nexus_extproc.apis.base import ApiFamily, ParsedRequest, model_of, opt_int, stream_flag, stream_options_of
from nexus_extproc.apis.errors import bad_request
from nexus_extproc.apis.openai_chat import OpenAIChat
from nexus_extproc.metering.tokenizers import PromptShape


def prompt_texts(value: Any, field: str) -> tuple[list[str], int]:
    """Texts and token-id count of an OpenAI prompt/input field (string, strings, ids, or id arrays)."""
    if isinstance(value, str):
        return [value], 0
    if isinstance(value, list):
        if all(isinstance(x, str) for x in value):
            return list(value), 0
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return [], len(value)
        if all(isinstance(x, list) and all(isinstance(y, int) for y in x) for x in value):
            return [], sum(len(x) for x in value)
    raise bad_request(f"'{field}' must be a string, an array of strings, or token ids")


class OpenAICompletions(OpenAIChat):
    api: ClassVar[str] = "openai_completions"
    family: ClassVar[ApiFamily] = "openai"
    path: ClassVar[str] = "/v1/completions"
    default_max_output: ClassVar[int | None] = 16  # the API's own default for max_tokens

    def parse(self, doc: dict[str, Any]) -> ParsedRequest:
        model = model_of(doc)
        texts, ids = prompt_texts(doc.get("prompt", ""), "prompt")
        suffix = doc.get("suffix")
        if isinstance(suffix, str):
            texts.append(suffix)
        return ParsedRequest(
            doc=doc,
            model=model,
            stream=stream_flag(doc),
            max_output_tokens=opt_int(doc, "max_tokens"),
            shape=PromptShape(messages=[], extra=texts, chat_format=False),
            client_wants_stream_usage=stream_options_of(doc),
            token_ids=ids,
        )
