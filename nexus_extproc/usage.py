"""Token usage as reported by a provider, normalised to genai-prices' conventions.

`input_tokens` is the whole prompt including cache reads and writes (OpenAI's `prompt_tokens` already is;
Anthropic's `input_tokens` is not, so the Anthropic translator adds them). Streams report usage in pieces,
so fields are optional and merged with "latest cumulative value wins".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenUsage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(slots=True)
class UsageReport:
    """Usage pieces seen so far in a response; None means 'not reported' (distinct from a reported 0)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None

    def merge(self, other: UsageReport) -> None:
        for name in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                     "reasoning_tokens"):
            v = getattr(other, name)
            if v is not None:
                setattr(self, name, v)

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
        )


def _int(v: object) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return None
    return v


def from_openai(u: object) -> UsageReport | None:
    """OpenAI chat/completions (`prompt_tokens`…) or responses/embeddings (`input_tokens`…) usage block."""
    if not isinstance(u, dict):
        return None
    r = UsageReport()
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
    if isinstance(out_details, dict):
        r.reasoning_tokens = _int(out_details.get("reasoning_tokens"))
    return r


def from_anthropic(u: object) -> UsageReport | None:
    """Anthropic usage: `input_tokens` excludes cache reads and writes, so they are added back here."""
    if not isinstance(u, dict):
        return None
    r = UsageReport()
    base = _int(u.get("input_tokens"))
    read = _int(u.get("cache_read_input_tokens"))
    write = _int(u.get("cache_creation_input_tokens"))
    if base is not None:
        r.input_tokens = base + (read or 0) + (write or 0)
        r.cache_read_tokens = read
        r.cache_write_tokens = write
    r.output_tokens = _int(u.get("output_tokens"))
    return r
