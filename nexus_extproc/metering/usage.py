"""Token usage in the price database's terms: what a request used, whoever reported it.

It lives in metering because pricing consumes it; the API profiles (apis/) fill it from provider responses, and
metering must not import them (lower layers never import higher ones).
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
    web_searches: int = 0
