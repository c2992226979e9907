"""Token usage as reported by a provider.

Settlement prices the provider's own usage block with genai-prices' extractor for that API (`raw` below),
so cache writes, web searches and whatever the database learns next are counted by its conventions, not ours.
The normalised fields here are what we still need ourselves: the estimate when a stream ends without usage,
token counts for records and metrics, and calibration. `input_tokens` is the whole prompt including cache
reads and writes (genai-prices' convention). Streams report usage in pieces, so fields are optional and merged
with "latest cumulative value wins".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nexus_extproc.metering.usage import TokenUsage

_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens",
           "web_searches")
MAX_RAW_KEYS = 64  # a usage block is a handful of keys; anything bigger is not one


@dataclass(slots=True)
class UsageReport:
    """Usage pieces seen so far in a response; None means 'not reported' (distinct from a reported 0)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    web_searches: int | None = None
    # The provider's usage block as sent (merged across stream events), for genai-prices' extractor.
    raw: dict[str, Any] | None = None
    # The model the response names (`model`, the first SSE chunk, `message_start`).
    model: str | None = field(default=None)

    def merge(self, other: UsageReport) -> None:
        for name in _FIELDS:
            v = getattr(other, name)
            if v is not None:
                setattr(self, name, v)
        if other.raw is not None:
            self.raw = merge_raw(self.raw, other.raw)
        if self.model is None and other.model is not None:
            self.model = other.model

    @property
    def complete(self) -> bool:
        return self.input_tokens is not None and self.output_tokens is not None

    def to_usage(self) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens or 0,
            output_tokens=self.output_tokens or 0,
            cache_read_tokens=self.cache_read_tokens or 0,
            cache_write_tokens=self.cache_write_tokens or 0,
            reasoning_tokens=self.reasoning_tokens or 0,
            web_searches=self.web_searches or 0,
        )


def merge_raw(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Later usage events carry cumulative values: the newer value wins, nested blocks merge key by key
    (Anthropic's `message_delta` may carry `server_tool_use` without repeating `cache_creation`)."""
    if old is None:
        return dict(new) if len(new) <= MAX_RAW_KEYS else {}
    out = dict(old)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        elif len(out) < MAX_RAW_KEYS or k in out:
            out[k] = v
    return out


def _int(v: object) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return None
    return v


def _model(v: object) -> str | None:
    return v if isinstance(v, str) and 0 < len(v) <= 256 else None


def from_openai(u: object, model: object = None) -> UsageReport | None:
    """OpenAI chat/completions (`prompt_tokens`…) or responses/embeddings (`input_tokens`…) usage block."""
    if not isinstance(u, dict):
        return None
    r = UsageReport(raw=u if len(u) <= MAX_RAW_KEYS else None, model=_model(model))
    if "prompt_tokens" in u or "completion_tokens" in u:
        r.input_tokens = _int(u.get("prompt_tokens"))
        r.output_tokens = _int(u.get("completion_tokens"))
        details = u.get("prompt_tokens_details") or {}
        out_details = u.get("completion_tokens_details") or {}
    else:
        r.input_tokens = _int(u.get("input_tokens"))
        r.output_tokens = _int(u.get("output_tokens"))
        details = u.get("input_tokens_details") or {}
        out_details = u.get("output_tokens_details") or {}
    if r.input_tokens is not None and r.output_tokens is None and "total_tokens" in u:
        r.output_tokens = 0  # embeddings: prompt and total only
    if isinstance(details, dict):
        r.cache_read_tokens = _int(details.get("cached_tokens"))
        r.cache_write_tokens = _int(details.get("cache_write_tokens"))
    if isinstance(out_details, dict):
        r.reasoning_tokens = _int(out_details.get("reasoning_tokens"))
    return r


def from_anthropic(u: object, model: object = None) -> UsageReport | None:
    """Anthropic usage: `input_tokens` excludes cache reads and writes, so they are added back here."""
    if not isinstance(u, dict):
        return None
    r = UsageReport(raw=u if len(u) <= MAX_RAW_KEYS else None, model=_model(model))
    base = _int(u.get("input_tokens"))
    read = _int(u.get("cache_read_input_tokens"))
    write = _int(u.get("cache_creation_input_tokens"))
    if base is not None:
        r.input_tokens = base + (read or 0) + (write or 0)
        r.cache_read_tokens = read
        r.cache_write_tokens = write
    r.output_tokens = _int(u.get("output_tokens"))
    tools = u.get("server_tool_use")
    if isinstance(tools, dict):
        r.web_searches = _int(tools.get("web_search_requests"))
    return r
