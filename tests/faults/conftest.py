"""Fault tier: the real Envoy, the real server process, and the faults done to them for real (kill -9,
SIGSTOP, a full tmpfs, a torn file). Each module gets its own stack; every scenario is bounded in count
and time and stays on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from nexus_extproc.ledger import SpendAgg, open_ledger
from tests.e2e.conftest import E2E, e2e, write_config

pytestmark = pytest.mark.faults

__all__ = ["E2E", "e2e", "ledger_spend", "send_threads", "wait_for", "write_config"]


def wait_for(pred: Any, timeout: float, what: str, step: float = 0.2) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ledger_spend(path: Path) -> tuple[list[SpendAgg], int]:
    """What the SQLite ledger holds, read by a separate connection (as an operator's report would)."""

    async def read() -> tuple[list[SpendAgg], int]:
        led = open_ledger("sqlite", path=str(path), timeout_ms=5000)
        try:
            return await led.spend(0, time.time() + 86400), await led.settlement_count()
        finally:
            await led.close()

    return asyncio.run(read())


def post(url: str, path: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None,
         timeout: float = 30) -> int:
    """Status code, or 0 when the connection broke (what a killed filter looks like to a client)."""
    h = {"content-type": "application/json", "authorization": "Bearer sk-test-not-a-real-key", **(headers or {})}
    try:
        if isinstance(body, dict):
            r = httpx.post(url + path, json=body, headers=h, timeout=timeout)
        else:
            r = httpx.post(url + path, content=body, headers=h, timeout=timeout)
        return r.status_code
    except httpx.HTTPError:
        return 0


def send_threads(n: int, fn: Any) -> list[Any]:
    """Run `fn(i)` for i in range(n) on threads; the list of their results (in order)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(n, 16)) as pool:
        return list(pool.map(fn, range(n)))
