"""OpenAI `/v1/responses/compact` (Codex's remote compaction): a billed model call, unary JSON, the same
request and usage shape as `/v1/responses`; metered and settled like one."""

from __future__ import annotations

from typing import ClassVar

from nexus_extproc.apis.openai_responses import OpenAIResponses


class OpenAIResponsesCompact(OpenAIResponses):
    api: ClassVar[str] = "openai_responses_compact"
    path: ClassVar[str] = "/v1/responses/compact"
