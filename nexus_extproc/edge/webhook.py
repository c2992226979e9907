"""The HTTP side of alert delivery: budget/alerts.py owns the queue, retries and counting, this owns the wire."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as delta-seconds or an HTTP-date (RFC 9110 §10.2.3); None when absent or unreadable."""
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        when = parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


async def post_json(url: str, payload: dict[str, Any], timeout_s: float) -> tuple[int, float | None]:
    """POST the payload; the HTTP status and Retry-After, or ConnectionError when nothing answered."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session, \
                session.post(url, json=payload) as r:
            return r.status, retry_after_seconds(r.headers.get("Retry-After"))
    except aiohttp.ClientError as e:
        raise ConnectionError(type(e).__name__) from None
