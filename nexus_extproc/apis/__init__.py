"""One translator per provider API, chosen by request path."""

from nexus_extproc.apis.anthropic_messages import AnthropicMessages
from nexus_extproc.apis.base import ParsedRequest, StreamEventInfo, Translator
from nexus_extproc.apis.openai_chat import OpenAIChat
from nexus_extproc.apis.openai_completions import OpenAICompletions
from nexus_extproc.apis.openai_embeddings import OpenAIEmbeddings
from nexus_extproc.apis.openai_responses import OpenAIResponses

TRANSLATORS: dict[str, Translator] = {
    t.path: t
    for t in (OpenAIChat(), OpenAICompletions(), OpenAIResponses(), OpenAIEmbeddings(), AnthropicMessages())
}


def for_path(path: str) -> Translator | None:
    """Exact API path match; the query string is ignored."""
    return TRANSLATORS.get(path.split("?", 1)[0].rstrip("/") or "/")


__all__ = ["TRANSLATORS", "ParsedRequest", "StreamEventInfo", "Translator", "for_path"]
