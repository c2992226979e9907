"""Issue 12: every recorded provider exchange replayed through the real Envoy and our server.

Per case: the settled cost equals genai-prices' price of the recorded usage to the micro-dollar, and the
client receives the recorded body byte for byte. Skips (with the reason) when ../shared is absent; CI has it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from nexus_dev.stack import Stack, admin_headers, free_port, wait_port
from tests.conftest import BACKENDS
from tests.corpus import ROOT, case_params, expected_micros

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def replay(tmp_path_factory) -> Iterator[Stack]:
    stack = Stack()
    try:
        stack.fake_ports = {"openai": free_port(), "anthropic": free_port(), "ollama": free_port()}
        p = stack._spawn([sys.executable, "-m", "tests.replay_upstream",
                          *[f"{n}={port}" for n, port in stack.fake_ports.items()]], "replay",
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
        for port in stack.fake_ports.values():
            wait_port(port, proc=p)
        cfg = tmp_path_factory.mktemp("replay") / "config.yaml"
        cfg.write_text(yaml.safe_dump({
            "backends": BACKENDS, "budget": {"monthly_limit_usd": 100_000},
            "store": {"kind": "sqlite", "path": str(cfg.parent / "ledger.db")},
            "server": {"grace_period_secs": 5, "max_request_body_bytes": 8 << 20}}))
        stack.start_extproc(cfg)
        stack.start_envoy()
        yield stack
    except BaseException:
        print(stack.log("extproc")[-4000:], stack.log("envoy")[-4000:])
        raise
    finally:
        stack.stop()


def spent(stack: Stack) -> tuple[int, int]:
    b = httpx.get(f"http://127.0.0.1:{stack.admin_port}/v1/stats", timeout=5, headers=admin_headers()).json()["budget"]
    return round(b["current_spending_usd"] * 1e6), round(b["reserved_usd"] * 1e6)


def settled_after(stack: Stack, before: int, timeout: float = 10) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s, r = spent(stack)
        if r == 0 and s != before:
            return s - before
        time.sleep(0.02)
    return spent(stack)[0] - before


@pytest.mark.parametrize("case", case_params())
def test_recorded_exchange_through_envoy(replay: Stack, case: dict[str, Any]):
    before, _ = spent(replay)
    headers = {"content-type": "application/json", "x-replay-case": case["name"],
               "authorization": "Bearer sk-not-real", "x-api-key": "sk-ant-not-real",
               "anthropic-version": "2023-06-01"}
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{replay.base_url}{case['path']}", content=json.dumps(case["request"]).encode(),
                   headers=headers)
    assert r.status_code == case["response_status"], r.text[:300]
    assert r.content == case["response_body"].encode()  # byte for byte, SSE included
    assert r.headers.get("x-nexus-token-tier") in ("exact", "approximation", "heuristic")
    assert settled_after(replay, before) == expected_micros(case)
