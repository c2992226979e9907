"""The HTTP side of alert delivery: budget/alerts.py owns the queue, retries and counting, this owns the wire."""

from __future__ import annotations

from typing import Any

import aiohttp


async def post_json(url: str, payload: dict[str, Any], timeout_s: float) -> int:
    """POST the payload; the HTTP status, or ConnectionError when nothing answered."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session, \
                session.post(url, json=payload) as r:
            return r.status
    except aiohttp.ClientError as e:
        raise ConnectionError(type(e).__name__) from None
