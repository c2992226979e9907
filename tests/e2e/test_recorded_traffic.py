"""Issue 12: every recorded provider exchange replayed through the real Envoy and our server.

Per case: the settled cost equals genai-prices' price of the recorded usage to the micro-dollar, and the
client receives the recorded body byte for byte. Skips (with the reason) when ../shared is absent; CI has it.

Issue 26: the same cases again as providers really send them, compressed (gzip for every case, br and zstd for
a quarter each, SSE flushed per chunk): the client's own accept-encoding goes upstream, the upstream compresses,
the client gets the provider's compressed bytes untouched, and the filter reads a decoded copy.
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

from nexus_dev.stack import Stack, admin_headers, wait_port
from tests.conftest import BACKENDS
from tests.corpus import ROOT, case_params, expected_micros
from tests.e2e.conftest import running, start_envoy_settled

pytestmark = pytest.mark.e2e


def _replay_stack(tmp_path_factory, settlement: str) -> Iterator[Stack]:
    with running(Stack()) as stack:
        for name in ("openai", "anthropic", "ollama"):
            stack.fake_ports[name] = stack.port()
        p = stack._spawn([sys.executable, "-m", "tests.replay_upstream",
                          *[f"{n}={port}" for n, port in stack.fake_ports.items()]], "replay",
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
        for port in stack.fake_ports.values():
            wait_port(port, proc=p)
        cfg = tmp_path_factory.mktemp("replay") / "config.yaml"
        cfg.write_text(yaml.safe_dump({
            "backends": BACKENDS, "budget": {"monthly_limit_usd": 100_000},
            "store": {"kind": "sqlite", "path": str(cfg.parent / "ledger.db")},
            "server": {"grace_period_secs": 5, "max_request_body_bytes": 8 << 20, "settlement": settlement}}))
        stack.start_extproc(cfg)
        start_envoy_settled(stack, settlement=settlement)  # each mode named, whatever the default
        yield stack


@pytest.fixture(scope="module")
def replay(tmp_path_factory) -> Iterator[Stack]:
    yield from _replay_stack(tmp_path_factory, "ext_proc")


@pytest.fixture(scope="module")
def replay_envoy(tmp_path_factory) -> Iterator[Stack]:
    """Issue 27's fast path: streams leave ext_proc; Envoy's sse_to_metadata reads their usage and the gRPC access
    log reports it (JSON answers keep the ext_proc path)."""
    yield from _replay_stack(tmp_path_factory, "envoy")


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


def _exchange(stack: Stack, case: dict[str, Any], extra: dict[str, str]) -> httpx.Response:
    before, _ = spent(stack)
    headers = {"content-type": "application/json", "x-replay-case": case["name"],
               "authorization": "Bearer sk-not-real", "x-api-key": "sk-ant-not-real",
               "anthropic-version": "2023-06-01", **extra}
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{stack.base_url}{case['path']}", content=json.dumps(case["request"]).encode(),
                   headers=headers)
    assert r.status_code == case["response_status"], r.text[:300]
    assert r.content == case["response_body"].encode()  # byte for byte (decoded by httpx), SSE included
    assert r.headers.get("x-nexus-token-tier") in ("exact", "approximation", "heuristic")
    assert settled_after(stack, before) == expected_micros(case)
    return r


def _last_upstream_request(stack: Stack, case: dict[str, Any]) -> dict[str, Any]:
    seen = httpx.get(f"http://127.0.0.1:{stack.fake_ports['openai']}/_replay/requests", timeout=5).json()
    return next(s for s in reversed(seen) if s["case"] == case["name"])


@pytest.mark.parametrize("case", case_params())
def test_recorded_exchange_through_envoy(replay: Stack, case: dict[str, Any]):
    _exchange(replay, case, {"accept-encoding": "identity"})
    assert _last_upstream_request(replay, case)["upstream_header"] is None  # our routing header stays ours


def _compressed_params() -> list[Any]:
    out = []
    for i, p in enumerate(case_params()):
        out.append(pytest.param(p.values[0], "gzip", id=f"{p.id}-gzip", marks=p.marks))
        if i % 4 in (1, 2) and p.values[0] is not None:
            enc = "br" if i % 4 == 1 else "zstd"
            out.append(pytest.param(p.values[0], enc, id=f"{p.id}-{enc}"))
    return out


# What the official clients send: the Anthropic and OpenAI Python SDKs (httpx), and Codex.
CLIENT_ACCEPT = {"gzip": "gzip, deflate, zstd", "br": "gzip, deflate, br", "zstd": "zstd,gzip"}


@pytest.mark.parametrize(("case", "encoding"), _compressed_params())
def test_recorded_exchange_compressed(replay: Stack, case: dict[str, Any], encoding: str):
    r = _exchange(replay, case, {"accept-encoding": CLIENT_ACCEPT[encoding], "x-replay-encoding": encoding})
    sent = _last_upstream_request(replay, case)
    assert sent["sent_encoding"] == encoding, sent  # the provider really did compress
    # The client's body is the provider's, in the encoding its header names (httpx decoded it to compare above).
    assert r.headers.get("content-encoding") == encoding


def _envoy_reports(stack: Stack) -> float:
    import re

    text = httpx.get(f"http://127.0.0.1:{stack.admin_port}/metrics", timeout=5).text
    m = re.search(r'^nexus_envoy_reports_total\{outcome="settled"\} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize(("case", "encoding"), [
    *[pytest.param(p.values[0], "identity", id=f"{p.id}-identity", marks=p.marks) for p in case_params()],
    *_compressed_params()])
def test_recorded_exchange_settled_by_envoy(replay_envoy: Stack, case: dict[str, Any], encoding: str):
    """Every case settles exactly on the fast path too; its usage came from Envoy's report (no byte of the response
    went to the server: sse_to_metadata read a stream, json_to_metadata a JSON answer), and Envoy decoded a
    compressed stream before reading it."""
    before = _envoy_reports(replay_envoy)
    extra = {"accept-encoding": CLIENT_ACCEPT.get(encoding, "identity")}
    if encoding != "identity":
        extra["x-replay-encoding"] = encoding
    r = _exchange(replay_envoy, case, extra)
    streamed = "event-stream" in case["response_content_type"]
    assert _envoy_reports(replay_envoy) - before == 1
    if encoding != "identity":
        # A stream comes compressed and Envoy decodes it; a JSON answer comes uncompressed (Envoy's decompressors
        # would stall json_to_metadata holding it, docs/streaming.md).
        assert _last_upstream_request(replay_envoy, case)["sent_encoding"] == (encoding if streamed else None)
        assert r.headers.get("content-encoding") is None
