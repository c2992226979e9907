"""OpenAI `/v1/embeddings`: input tokens only, never streamed."""

from __future__ import annotations

from typing import Any, ClassVar

from nexus_extproc.apis.base import ApiFamily, ParsedRequest, StreamEventInfo, Translator, model_of
from nexus_extproc.apis.openai_completions import prompt_texts
from nexus_extproc.apis.usage import UsageReport, from_openai
from nexus_extproc.metering.tokenizers import PromptShape


class OpenAIEmbeddings(Translator):
    api: ClassVar[str] = "openai_embeddings"
    family: ClassVar[ApiFamily] = "openai"
    path: ClassVar[str] = "/v1/embeddings"
    usage_flavor: ClassVar[str] = "embeddings"

    def parse(self, doc: dict[str, Any]) -> ParsedRequest:
        model = model_of(doc)
        texts, ids = prompt_texts(doc.get("input"), "input")
        return ParsedRequest(
            doc=doc,
            model=model,
            stream=False,
            max_output_tokens=0,
            shape=PromptShape(messages=[], extra=texts, chat_format=False),
            token_ids=ids,
        )

    def response_usage(self, doc: dict[str, Any]) -> UsageReport | None:
        r = from_openai(doc.get("usage"), doc.get("model"))
        if r is not None:
            r.output_tokens = 0
        return r

    def stream_event(self, event: str | None, data: dict[str, Any]) -> StreamEventInfo:
        return StreamEventInfo()
