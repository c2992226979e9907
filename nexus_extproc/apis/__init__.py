"""One translator per provider API, chosen by request path."""

from nexus_extproc.apis.anthropic_messages import AnthropicMessages
from nexus_extproc.apis.base import ParsedRequest, StreamEventInfo, Translator
from nexus_extproc.apis.openai_chat import OpenAIChat
from nexus_extproc.apis.openai_completions import OpenAICompletions
from nexus_extproc.apis.openai_embeddings import OpenAIEmbeddings
from nexus_extproc.apis.openai_responses import OpenAIResponses
from nexus_extproc.apis.openai_responses_compact import OpenAIResponsesCompact

TRANSLATORS: dict[str, Translator] = {
    t.path: t
    for t in (OpenAIChat(), OpenAICompletions(), OpenAIResponses(), OpenAIResponsesCompact(), OpenAIEmbeddings(),
              AnthropicMessages())
}


def for_path(path: str) -> Translator | None:
    """Exact API path match; the query string is ignored."""
    return TRANSLATORS.get(path.split("?", 1)[0].rstrip("/") or "/")


def family_for_path(path: str) -> str:
    """Whose error shape a request gets, also on a path no profile serves (`/v1/messages/batches` is still an
    Anthropic client): the family of the profile whose path it extends, else OpenAI's."""
    t = for_path(path)
    if t is not None:
        return t.family
    bare = path.split("?", 1)[0]
    return next((t.family for p, t in TRANSLATORS.items() if bare.startswith(p + "/")), "openai")


__all__ = ["TRANSLATORS", "ParsedRequest", "StreamEventInfo", "Translator", "family_for_path", "for_path"]
