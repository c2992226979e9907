"""Issue 26: the wire as real clients use it, through the real Envoy: free endpoints pass uncharged, Codex's
compaction is metered, a WebSocket upgrade gets the answer that sends Codex to HTTP at once, Envoy's own
refusals speak the client's API, and our routing header never reaches a provider."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.e2e.conftest import E2E

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def budgeted(e2e: E2E, tmp_path_factory) -> None:
    e2e.restart(budget={"monthly_limit_usd": 1000},
                store={"kind": "sqlite", "path": str(tmp_path_factory.mktemp("wire") / "ledger.db")})


def counter(e2e: E2E, name: str, labels: str = "") -> float:
    m = re.search(rf"^{name}{{{labels}}} ([0-9.e+]+)$" if labels else rf"^{name} ([0-9.e+]+)$", e2e.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def spend(e2e: E2E) -> tuple[float, float]:
    b = e2e.stats()["budget"]
    return b["current_spending_usd"], b["reserved_usd"]


def test_count_tokens_passes_uncharged_and_counted(e2e: E2E):
    """Claude Code's /context: a 404 here made it re-send 18 payloads to /v1/messages, all billed."""
    before_spend = spend(e2e)
    before = counter(e2e, "nexus_passthrough_requests_total", 'endpoint="count_tokens"')
    client = anthropic.Anthropic(base_url=e2e.url, api_key="sk-ant-test", max_retries=0, timeout=30)
    n = client.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "Hello!"}],
                                     tools=[{"name": "get_weather", "description": "Weather for a city",
                                             "input_schema": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}])
    assert n.input_tokens > 20  # the fake counts the tool schema, as the API does
    assert counter(e2e, "nexus_passthrough_requests_total", 'endpoint="count_tokens"') - before == 1
    assert spend(e2e) == before_spend  # never reserved, never settled
    seen = e2e.fake_requests("anthropic")[-1]
    assert seen["path"] == "/v1/messages/count_tokens" and "x-nexus-upstream" not in seen["headers"]


def test_model_listing_goes_to_the_callers_provider(e2e: E2E):
    openai_ids = [m.id for m in e2e.openai().models.list()]
    assert "gpt-4o" in openai_ids
    claude = anthropic.Anthropic(base_url=e2e.url, api_key="sk-ant-test", max_retries=0, timeout=30)
    assert all(m.id.startswith("claude-") for m in claude.models.list())
    # Claude Code's start-up probe.
    r = httpx.head(e2e.url + "/", headers={"anthropic-version": "2023-06-01", "x-api-key": "k"}, timeout=10)
    assert r.status_code == 200 and r.headers["x-fake-upstream"] == "anthropic"


def test_responses_compact_is_metered_and_settled(e2e: E2E):
    """Codex's remote compaction is a billed model call; it used to get the filter's 404."""
    before, _ = spend(e2e)
    r = httpx.post(e2e.url + "/v1/responses/compact", timeout=30, json={
        "model": "gpt-4o", "instructions": "You are Codex.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "a long conversation " * 50}]}]})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "response.compaction" and r.headers["x-nexus-token-tier"] == "exact"
    assert float(r.headers["x-nexus-cost-estimated"]) > 0
    for _ in range(100):
        after, reserved = spend(e2e)
        if after > before and reserved == 0:
            break
    usage = r.json()["usage"]
    # gpt-4o: $2.50 in, $10 out per million tokens; settled from the provider's usage, rounded up.
    expected = (usage["input_tokens"] * 2.5 + usage["output_tokens"] * 10) / 1e6
    assert after - before == pytest.approx(expected, abs=2e-6)


def _raw(e2e: E2E, request: bytes) -> bytes:
    host, port = e2e.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        out = b""
        while b"\r\n\r\n" not in out or len(out) < out.find(b"\r\n\r\n") + 4 + 60:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def test_websocket_upgrade_gets_426(e2e: E2E):
    """Codex's built-in provider opens GET /v1/responses as a WebSocket first; Envoy's 403 cost it seven
    retries (~6 s); a 426 makes it fall back to HTTP at once (openai/codex#43353)."""
    out = _raw(e2e, b"GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"openai-beta: responses_websockets=2026-02-06\r\n\r\n")
    status = out.split(b"\r\n", 1)[0]
    assert b" 426 " in status, out[:300]
    assert b'"websocket_not_supported"' in out


def test_unknown_post_path_is_refused_in_the_clients_shape(e2e: E2E):
    r = httpx.post(e2e.url + "/v1/messages/batches", json={"requests": []}, timeout=10)
    assert r.status_code == 404 and r.json()["type"] == "error"
    r = httpx.post(e2e.url + "/v1/fine_tuning/jobs", json={}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_long_context_with_images_passes_and_settles(e2e: E2E):
    """A 9.5 MB Anthropic request (long context and an image), which the provider accepts (its limit is 32 MB),
    got Envoy's 413 at the old 8 MiB buffer limit; it is admitted, forwarded whole and settled."""
    import base64
    import os

    before, _ = spend(e2e)
    image = base64.b64encode(os.urandom(7 << 20)).decode()
    client = anthropic.Anthropic(base_url=e2e.url, api_key="sk-ant-test", max_retries=0, timeout=60)
    msg = client.messages.create(model="claude-haiku-4-5", max_tokens=20, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
        {"type": "text", "text": "What does this show? " * 2000}]}])
    assert msg.usage.input_tokens > 8000
    seen = e2e.fake_requests("anthropic")[-1]
    assert seen["path"] == "/v1/messages" and seen["body_bytes"] > 9_500_000  # forwarded whole
    for _ in range(100):
        after, reserved = spend(e2e)
        if after > before and reserved == 0:
            break
    # claude-haiku-4-5: $1 in, $5 out per million, settled from the provider's usage.
    expected = (msg.usage.input_tokens * 1 + msg.usage.output_tokens * 5) / 1e6
    assert after - before == pytest.approx(expected, abs=2e-6)


def test_envoys_own_413_speaks_the_clients_api(e2e: E2E):
    """Past Envoy's 32 MiB request buffer (the json_to_metadata filter buffers before ext_proc), Envoy answers
    itself: the body is still the provider's error shape, not plain text."""
    from nexus_dev.envoy_config import REQUEST_BODY_LIMIT

    big = b'{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[{"role":"user","content":"' \
        + b"x" * (REQUEST_BODY_LIMIT + 1) + b'"}]}'
    r = httpx.post(e2e.url + "/v1/messages", content=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.headers["content-type"] == "application/json"
    assert r.json() == {"type": "error", "error": {"type": "request_too_large",
                                                   "message": "the request body exceeds the proxy's buffer limit"}}
    r = httpx.post(e2e.url + "/v1/chat/completions", content=big, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def _envoy_stat(e2e: E2E, suffix: str) -> int:
    text = httpx.get(f"http://127.0.0.1:{e2e.stack.envoy_admin_port}/stats", timeout=5).text
    return sum(int(v) for k, _, v in (ln.partition(": ") for ln in text.splitlines())
               if k.endswith(suffix) and v.strip().isdigit())


def test_compressed_fake_answer_settles_from_usage(e2e: E2E):
    """The demo's fakes compress as the providers do; the filter reads the usage through it."""
    before, _ = spend(e2e)
    client = anthropic.Anthropic(base_url=e2e.url, api_key="sk-ant-test", max_retries=0, timeout=30,
                                 default_headers={"x-fake-encoding": "gzip", "x-fake-completion-tokens": "7"})
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=50,
                                messages=[{"role": "user", "content": "Hi"}]) as s:
        final = s.get_final_message()
        raw_encoding = s.response.headers.get("content-encoding")
    # Under the default Envoy settlement, Envoy's decompressor decodes the stream to read it, so the client gets
    # it decoded; the server-read path passes the provider's gzip through.
    decoded = _envoy_stat(e2e, "decompressor.gzip.gzip.response.decompressed")
    assert final.usage.output_tokens == 7
    assert raw_encoding == "gzip" or (raw_encoding is None and decoded > 0)
    for _ in range(100):
        after, reserved = spend(e2e)
        if after > before and reserved == 0:
            break
    # claude-haiku-4-5: $1 in, $5 out per million.
    expected = (final.usage.input_tokens * 1 + 7 * 5) / 1e6
    assert after - before == pytest.approx(expected, abs=2e-6)


def test_tool_and_session_attribution_from_the_clients_headers(e2e: E2E):
    """Claude Code sends its own User-Agent and session id; spend reports group by both (the id hashed)."""
    from nexus_dev.stack import admin_headers

    client = anthropic.Anthropic(base_url=e2e.url, api_key="sk-ant-test", max_retries=0, timeout=30,
                                 default_headers={"user-agent": "claude-cli/2.1.12 (external, cli)",
                                                  "x-claude-code-session-id": "sess-visible-nowhere"})
    for _ in range(2):
        client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    rows: list[dict[str, str]] = []
    for _ in range(100):
        rows = httpx.get(f"http://127.0.0.1:{e2e.stack.admin_port}/v1/spend?group_by=tool,session", timeout=5,
                         headers=admin_headers()).json()["rows"]
        if any(r["tool"] == "claude-code" and r["requests"] == 2 for r in rows):
            break
    mine = [r for r in rows if r["tool"] == "claude-code"]
    assert len(mine) == 1 and mine[0]["requests"] == 2, rows
    assert mine[0]["session"].startswith("s-") and "visible" not in str(rows)


def _both_apis(url: str, headers: dict[str, str] | None = None) -> tuple[httpx.Response, httpx.Response]:
    """A minimal OpenAI chat request and a minimal Anthropic one, for the refusals Envoy makes itself."""
    openai_reply = httpx.post(url + "/v1/chat/completions", timeout=30, headers=headers, json={
        "model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    anthropic_reply = httpx.post(url + "/v1/messages", timeout=30,
                                 headers={"anthropic-version": "2023-06-01", **(headers or {})},
                                 json={"model": "claude-haiku-4-5", "max_tokens": 3,
                                       "messages": [{"role": "user", "content": "Hi"}]})
    return openai_reply, anthropic_reply


def test_envoys_own_503_speaks_the_clients_api(e2e: E2E, tmp_path):
    """An upstream that refuses connections: Envoy's own 503 ('upstream connect error…', plain text by default)
    reaches an SDK in its provider's error shape."""
    from tests.conftest import BACKENDS

    dead = {**BACKENDS, "openai": {**BACKENDS["openai"], "cluster": "vllm"},  # nothing listens on vllm's port
            "anthropic": {**BACKENDS["anthropic"], "cluster": "vllm"}}
    e2e.restart(backends=dead, store={"kind": "sqlite", "path": str(tmp_path / "l.db")})
    try:
        r, a = _both_apis(e2e.url)
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable", r.text
        assert a.status_code == 503 and a.json() == {"type": "error", "error": {
            "type": "overloaded_error", "message": "the upstream is unavailable"}}
    finally:
        e2e.restart(budget={"monthly_limit_usd": 1000},
                    store={"kind": "sqlite", "path": str(tmp_path / "ledger2.db")})


def test_envoys_own_500_speaks_the_clients_api_when_the_server_is_down(e2e: E2E, tmp_path):
    """failure_mode_allow: false: with the server unreachable Envoy refuses (nothing reaches a provider unbudgeted)
    with a 500 whose body was empty text/plain; on the API paths it is now the provider's error shape, and other
    paths (a gateway shared with other traffic) keep Envoy's own answer."""
    e2e.stack.stop_extproc()
    try:
        r, a = _both_apis(e2e.url)
        assert r.status_code == 500 and r.json()["error"]["code"] == "budget_filter_unavailable", r.text
        assert a.status_code == 500 and a.json()["type"] == "error" and a.json()["error"]["type"] == "api_error"
        r = httpx.post(e2e.url + "/internal/thing", content=b"{}", timeout=30)
        assert r.status_code == 500 and r.headers.get("content-type") != "application/json"
    finally:
        e2e.restart(budget={"monthly_limit_usd": 1000}, store={"kind": "sqlite", "path": str(tmp_path / "l.db")})


@contextlib.contextmanager
def second_envoy(e2e: E2E, **fields: Any) -> Iterator[str]:
    """Another Envoy in front of the same server and fakes, built with these EnvoyParams fields: its URL, once its
    health check has seen the server."""
    from nexus_dev.envoy_config import build_config, dump
    from nexus_dev.stack import envoy_binary, free_port, wait_http

    stack = e2e.stack
    params = stack.envoy_params()
    params.listen_port, params.admin_port = stack.port(), stack.port()
    for k, v in fields.items():
        setattr(params, k, v)
    cfg = stack.workdir / f"envoy-{params.listen_port}.yaml"
    cfg.write_text(dump(build_config(params)))
    proc = stack._spawn([envoy_binary(), "-c", str(cfg), "--concurrency", "1", "--log-level", "warn",
                         "--base-id", str(free_port())], f"envoy-{params.listen_port}")
    try:
        wait_http(f"http://127.0.0.1:{params.admin_port}/ready", timeout=30, proc=proc)
        e2e.wait_envoy_sees_extproc(admin_port=params.admin_port)
        yield f"http://127.0.0.1:{params.listen_port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_envoys_own_504_speaks_the_clients_api(e2e: E2E):
    """A provider slower than the route's timeout: Envoy's own 504 reaches an SDK in its provider's error shape
    (an Envoy with a 1 s route timeout)."""
    with second_envoy(e2e, upstream_timeout="1s") as url:
        r, a = _both_apis(url, {"x-fake-fault": "slow", "x-fake-delay-ms": "3000"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout", r.text
        assert a.status_code == 504 and a.json() == {"type": "error", "error": {
            "type": "timeout_error", "message": "the upstream did not answer in time"}}


def test_settlement_reads_the_decoded_answer_under_envoys_own_compressor(e2e: E2E):
    """'With or without Envoy's compressor toward the client': an Envoy that gzips its answers (the compressor
    first in the chain, last on the response) still settles each answer from the provider's usage, and the client
    gets gzip it can decode: a JSON answer, an Anthropic stream the provider gzipped (Envoy decodes it, reads it,
    the compressor encodes it again), and the OpenAI SDK's default stream (its added usage chunk still hidden)."""
    with second_envoy(e2e, compress_to_client=True) as url:
        cases = [
            ("/v1/chat/completions", {"model": "gpt-4o", "max_tokens": 20}, {}, 2.5, 10),
            ("/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 20, "stream": True},
             {"x-fake-encoding": "gzip", "anthropic-version": "2023-06-01"}, 1, 5),
            ("/v1/chat/completions", {"model": "gpt-4o", "max_tokens": 20, "stream": True}, {}, 2.5, 10)]
        prompts: dict[str, int] = {}
        for path, doc, headers, per_in, per_out in cases:
            for _ in range(200):
                before, reserved = spend(e2e)
                if reserved == 0:
                    break
                time.sleep(0.05)
            r = httpx.post(url + path, timeout=15, json={**doc, "messages": [{"role": "user", "content": "Hi"}]},
                           headers={"accept-encoding": "gzip", "x-fake-completion-tokens": "7", **headers})
            assert r.status_code == 200 and r.headers["content-encoding"] == "gzip", (path, r.headers)
            assert '"choices":[]' not in r.text.replace(" ", "")  # no usage-only chunk the client did not ask for
            assert e2e.fake_requests("anthropic" if "messages" in path else "openai")[-1]["path"] == path
            for _ in range(100):
                after, reserved = spend(e2e)
                if after > before and reserved == 0:
                    break
                time.sleep(0.05)
            # The prompt's tokens as the provider counted them (the hidden-usage stream shows none: the JSON
            # answer to the same messages and model does).
            m = re.search(r'"(?:prompt|input)_tokens":\s*(\d+)', r.text)
            prompt = prompts.setdefault(path, int(m.group(1)) if m else 0)
            assert after - before == pytest.approx((prompt * per_in + 7 * per_out) / 1e6, abs=2e-6), path


def test_answers_compressed_against_identity_never_hang(e2e: E2E):
    """Whatever the provider does: the server asks for identity where a reader would stall on a decoded body (a
    JSON answer read by json_to_metadata), and a provider (or a CDN) that compresses anyway must not hang the
    client. The JSON answer reaches the client decoded and settles at its estimate (its usage unread, counted);
    a stream compressed the same way is decoded by Envoy and settles exactly."""
    rude = {"x-fake-encoding": "gzip", "x-fake-encoding-ignores": "accept-encoding", "accept-encoding": "identity",
            "x-fake-completion-tokens": "9"}
    for _ in range(200):  # nothing of an earlier test's still in flight
        before_spend, reserved = spend(e2e)
        if reserved == 0:
            break
        time.sleep(0.05)
    unread = counter(e2e, "nexus_envoy_reports_total", 'outcome="no_usage"')
    r = httpx.post(e2e.url + "/v1/chat/completions", headers=rude, timeout=15, json={
        "model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 9
    assert e2e.fake_requests("openai")[-1]["path"] == "/v1/chat/completions"
    for _ in range(100):
        after, reserved = spend(e2e)
        if after > before_spend and reserved == 0:
            break
        time.sleep(0.05)
    assert after - before_spend == pytest.approx(float(r.headers["x-nexus-cost-estimated"]), abs=2e-6)
    assert counter(e2e, "nexus_envoy_reports_total", 'outcome="no_usage"') - unread == 1

    before_spend = after
    client = anthropic.Anthropic(base_url=e2e.url, api_key="sk-ant-test", max_retries=0, timeout=15,
                                 default_headers=rude)
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=50,
                                messages=[{"role": "user", "content": "Hi"}]) as s:
        final = s.get_final_message()
    for _ in range(100):
        after, reserved = spend(e2e)
        if after > before_spend and reserved == 0:
            break
        time.sleep(0.05)
    # claude-haiku-4-5: $1 in, $5 out per million, from the provider's usage.
    assert after - before_spend == pytest.approx((final.usage.input_tokens + 9 * 5) / 1e6, abs=2e-6)


def test_a_compressed_request_body_is_refused_up_front(e2e: E2E):
    """A request body sent compressed (Codex zstd-compresses toward the ChatGPT backend) cannot be read: a clear
    415 in the client's shape at the request headers, nothing reserved, nothing sent on; it used to be buffered
    and refused as 'not UTF-8 encoded JSON'."""
    import gzip

    before = spend(e2e)
    seen = len(e2e.fake_requests("openai")) + len(e2e.fake_requests("anthropic"))
    doc = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    r = httpx.post(e2e.url + "/v1/chat/completions", content=gzip.compress(json.dumps(doc).encode()), timeout=10,
                   headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_content_encoding", r.text
    doc = {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(e2e.url + "/v1/messages", content=gzip.compress(json.dumps(doc).encode()), timeout=10,
                   headers={"content-type": "application/json", "content-encoding": "zstd"})
    assert r.status_code == 415 and r.json()["error"]["type"] == "unsupported_content_encoding", r.text
    assert spend(e2e) == before
    assert len(e2e.fake_requests("openai")) + len(e2e.fake_requests("anthropic")) == seen
    assert re.search(r'^nexus_bad_requests_total\{reason="encoded_body"\} 2\.0$', e2e.metrics(), re.M)


def test_a_refused_default_openai_stream_gets_its_error_body(e2e: E2E, tmp_path):
    """The OpenAI SDK's default stream (no include_usage) takes the route whose Lua filter hides the usage chunk
    the server adds. The filter's own refusals on that route are JSON, not events: they reach the client whole
    (the Lua filter held them as a partial event, and a 400 or a budget's 503 arrived with an empty body)."""
    import openai

    client = e2e.openai()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], stream=True,
                                       max_tokens=-5)
    assert bad.value.code == "invalid_request_error" and "max_tokens" in bad.value.message
    e2e.restart(budget={"monthly_limit_usd": 0.000001, "hard_limit_action": "block_all"},
                store={"kind": "sqlite", "path": str(tmp_path / "exhausted.db")})
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}],
                                           stream=True)
        assert refused.value.status_code == 503 and refused.value.code == "budget_exceeded", refused.value
        assert refused.value.response.headers["x-should-retry"] == "false"
    finally:
        e2e.restart(budget={"monthly_limit_usd": 1000}, store={"kind": "sqlite", "path": str(tmp_path / "l.db")})
