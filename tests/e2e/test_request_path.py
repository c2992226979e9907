"""Issue 3 through the real Envoy with the official SDKs."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from nexus_dev.envoy_config import EnvoyParams, build_config, dump
from nexus_dev.stack import REPO, admin_headers, envoy_binary

MSGS = [{"role": "user", "content": "Say hello to the budget service."}]


def test_shipped_envoy_config_validates_and_is_fresh():
    path = REPO / "envoy" / "nexus.yaml"
    assert path.read_text() == dump(build_config(EnvoyParams())), "run `make envoy-config`"
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


def test_chat_json_has_nexus_headers(e2e):
    raw = e2e.openai().chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS, max_tokens=30)
    h = raw.headers
    resp = raw.parse()
    assert h["x-nexus-backend-type"] == "cloud" and h["x-nexus-token-tier"] == "exact"
    assert h["x-fake-upstream"] == "openai"
    # Estimate: exact prompt count × $2.50/M + min(30, default 512) × $10/M.
    prompt = resp.usage.prompt_tokens
    assert float(h["x-nexus-cost-estimated"]) == pytest.approx((prompt * 2.5 + 30 * 10) / 1e6, abs=1e-6)
    assert "x-nexus-budget-status" not in h


def test_exact_tier_matches_fake_provider_prompt_tokens(e2e):
    client = e2e.openai()
    convo = [{"role": "system", "content": "You are terse."}, {"role": "user", "name": "ann", "content": "Hi!"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Cost of tea? " * 50}]
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=convo, max_tokens=1)
    est_prompt_micros = float(raw.headers["x-nexus-cost-estimated"]) * 1e6 - 1 * 10
    assert round(est_prompt_micros / 2.5) == raw.parse().usage.prompt_tokens


def test_chat_stream_without_usage_request_gets_no_usage_chunk(e2e):
    chunks = list(e2e.openai().chat.completions.create(model="gpt-4o", messages=MSGS, stream=True, max_tokens=5))
    assert chunks and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok tok tok tok tok"
    seen = e2e.fake_requests("openai")[-1]
    assert seen["stream_options"] == {"include_usage": True}  # added by the filter on the way up


def test_chat_stream_with_usage_request_keeps_it(e2e):
    chunks = list(e2e.openai().chat.completions.create(model="gpt-4o", messages=MSGS, stream=True, max_tokens=5,
                                                       stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_completions_responses_embeddings(e2e):
    c = e2e.openai()
    assert c.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=3).usage.completion_tokens == 3
    raw = c.responses.with_raw_response.create(model="gpt-4o", input="hello", max_output_tokens=4)
    assert raw.parse().usage.output_tokens == 4 and raw.headers["x-nexus-token-tier"] == "exact"
    events = list(c.responses.create(model="gpt-4o", input="hello", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.completed"
    raw = c.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a b c", "d"])
    assert len(raw.parse().data) == 2 and float(raw.headers["x-nexus-cost-estimated"]) > 0


def test_anthropic_json_and_stream(e2e):
    a = e2e.anthropic()
    raw = a.messages.with_raw_response.create(model="claude-3-5-haiku-latest", max_tokens=8,
                                              messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-nexus-token-tier"] == "approximation" and raw.headers["x-fake-upstream"] == "anthropic"
    assert raw.parse().usage.output_tokens == 8
    with a.messages.stream(model="claude-sonnet-4-5", max_tokens=6,
                           messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "tok tok tok tok tok tok" and final.usage.output_tokens == 6


@pytest.mark.parametrize(("path", "body", "key"), [
    ("/v1/chat/completions", b"{broken", "error"),
    ("/v1/messages", b"{broken", "type"),
    ("/v1/chat/completions", b'{"model": "gpt-4o"}', "error"),
    ("/v1/chat/completions", "{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"\xe9\"}]}"
     .encode("latin-1"), "error"),
])
def test_bad_input_is_400_in_provider_shape(e2e, path, body, key):
    r = httpx.post(e2e.url + path, content=body, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert key in r.json()
    ok = e2e.openai().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=1)
    assert ok.choices  # the server keeps serving


def test_body_over_buffer_limit_is_413(e2e):
    from nexus_dev.envoy_config import REQUEST_BODY_LIMIT

    big = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (REQUEST_BODY_LIMIT + 1)}]})
    r = httpx.post(e2e.url + "/v1/chat/completions", content=big, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413


def test_spoofed_upstream_and_status_headers_are_ignored(e2e):
    raw = e2e.openai(default_headers={"x-nexus-upstream": "ollama", "x-nexus-budget-status": "Normal"}) \
        .chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS, max_tokens=1)
    assert raw.headers["x-fake-upstream"] == "openai"
    seen = e2e.fake_requests("openai")[-1]
    assert not [h for h in seen["headers"] if h.lower().startswith("x-nexus-") and h.lower() != "x-nexus-upstream"]


def test_unknown_path_is_404(e2e):
    # GET /v1/models passes through uncharged since issue 26 (tests/e2e/test_wire.py); an unknown POST does not.
    r = httpx.post(e2e.url + "/v1/assistants", json={"model": "gpt-4o"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def _logged_usage(e2e, rids: list[str], timeout: float = 10) -> dict[str, dict]:
    """The provider's usage Envoy logged for each request id (envoy/nexus.yaml's access log: `usage=`, the
    nexus.usage metadata its settlement filters wrote), once every id has its line."""
    found: dict[str, dict] = {}
    end = time.monotonic() + timeout
    while time.monotonic() < end:  # Envoy flushes its access log every 250 ms here; a loaded machine is slower
        for ln in Path(e2e.stack.workdir / "access.log").read_text().splitlines():
            rid = ln.split(" request_id=")[1].split()[0] if " request_id=" in ln else ""
            if rid in rids and " usage={" in ln:
                found[rid] = json.loads(json.loads(ln.split(" usage=", 1)[1])["usage"])
        if len(found) == len(rids):
            break
        time.sleep(0.1)
    return found


def test_access_log_carries_the_request_id_and_the_providers_usage(e2e):
    """settlement: envoy: the line of a stream Envoy read keeps its request id and the provider's usage tokens;
    the final cost is in the ledger (and /v1/spend, the metrics)."""
    exact = _exact_settlements(e2e)
    raw = e2e.openai().chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS, max_tokens=2,
                                                                 stream=True)
    rid = raw.headers["x-nexus-request-id"]
    list(raw.parse())
    usage = _logged_usage(e2e, [rid]).get(rid)
    assert usage is not None, "no line for the stream in the access log"
    assert usage["completion_tokens"] == 2 and usage["prompt_tokens"] > 0
    for _ in range(50):  # and it settled from that usage
        if _exact_settlements(e2e) > exact:
            break
        time.sleep(0.1)
    assert _exact_settlements(e2e) - exact >= 1  # (an earlier test's report may land meanwhile)


def _exact_settlements(e2e) -> float:
    m = re.search(r'^nexus_settlements_total{source="usage"} ([0-9.e+]+)$', e2e.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def _ext_proc_messages(admin_port: int) -> int:
    text = httpx.get(f"http://127.0.0.1:{admin_port}/stats?filter=ext_proc.stream_msgs_received", timeout=5).text
    return sum(int(v) for k, _, v in (ln.partition(": ") for ln in text.splitlines()) if v.strip().isdigit())


def test_a_json_request_costs_two_ext_proc_messages_and_a_stream_keeps_streaming(e2e):
    """envoy/nexus.yaml (settlement in Envoy, the default) sends the request headers and the request body, and
    nothing of the response (Envoy's filters read its usage); a stream request whose usage chunk the server
    hides is routed (json_to_metadata reads `stream` and `stream_options`) to STREAMED chunks."""
    before = _ext_proc_messages(e2e.stack.envoy_admin_port)
    for _ in range(5):
        raw = e2e.openai().chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS, max_tokens=5)
        assert raw.headers["x-nexus-backend-type"] == "cloud" and len(raw.headers["x-nexus-request-id"]) == 32
    time.sleep(0.2)
    assert _ext_proc_messages(e2e.stack.envoy_admin_port) - before == 10
    # A stream: its events arrive one by one (the fake paces them), not buffered to the end.
    arrivals = []
    t0 = time.monotonic()
    with httpx.stream("POST", f"{e2e.url}/v1/chat/completions", timeout=30,
                      headers={"x-fake-delay-ms": "50", "x-fake-completion-tokens": "6"},
                      json={"model": "gpt-4o", "messages": MSGS, "max_tokens": 6, "stream": True}) as r:
        assert r.headers["x-nexus-token-tier"] == "exact" and r.headers["x-nexus-backend-type"] == "cloud"
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic() - t0)
                assert '"usage"' not in line or '"choices": []' not in line  # the usage chunk we asked for: hidden
    assert len(arrivals) >= 6 and arrivals[-1] - arrivals[0] > 0.15, arrivals


def test_the_four_exchange_mode_of_the_mesh_integrations_still_works(e2e, tmp_path):
    """Istio's EnvoyFilter and Envoy Gateway send the response headers: the server adds X-Nexus-* there and
    picks STREAMED for SSE by mode_override, as before."""
    from nexus_dev.stack import free_port

    params = e2e.stack.envoy_params()
    params.skip_response_headers, params.settlement = False, "ext_proc"
    params.listen_port, params.admin_port = free_port(), free_port()
    cfg = tmp_path / "four.yaml"
    cfg.write_text(dump(build_config(params)))
    proc = subprocess.Popen([envoy_binary(), "-c", str(cfg), "--base-id", str(free_port()), "--log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{params.listen_port}"
        end = time.monotonic() + 20
        while True:
            try:
                r = httpx.post(f"{url}/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS,
                                                                   "max_tokens": 5}, timeout=10)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, "the four-exchange Envoy never answered"
            time.sleep(0.3)
        assert r.headers["x-nexus-backend-type"] == "cloud" and "x-nexus-cost-estimated" in r.headers
        before = _ext_proc_messages(params.admin_port)
        httpx.post(f"{url}/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS, "max_tokens": 5},
                   timeout=10)
        time.sleep(0.2)
        assert _ext_proc_messages(params.admin_port) - before == 4
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                          json={"model": "gpt-4o", "messages": MSGS, "max_tokens": 4, "stream": True}) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
            assert s.headers["x-nexus-token-tier"] == "exact"
        assert lines[-1] == "data: [DONE]" and not any('"choices": []' in ln for ln in lines)
    finally:
        proc.terminate()
        proc.wait(10)


def test_envoy_reaches_the_server_over_a_unix_socket(tmp_path):
    """server.uds_path: the server also listens on a Unix socket; Envoy's cluster uses a `pipe` endpoint."""
    from nexus_dev.stack import Stack
    from tests.e2e.conftest import write_config

    sock = str(tmp_path / "extproc.sock")
    stack = Stack()
    try:
        stack.start_fakes(("openai",))
        stack.start_extproc(write_config(stack.workdir / "uds.yaml", budget={"monthly_limit_usd": 10},
                                         store={"kind": "sqlite", "path": str(tmp_path / "l.db")},
                                         server={"uds_path": sock, "grace_period_secs": 5}))
        stack.envoy_port = stack.envoy_admin_port = 0
        stack.envoy_port = stack.port()
        stack.envoy_admin_port = stack.port()
        params = stack.envoy_params()
        params.extproc_uds = [sock]
        stack.start_envoy(params=params)
        assert Path(sock).is_socket()
        r = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=10,
                       json={"model": "gpt-4o", "messages": MSGS, "max_tokens": 5})
        assert r.status_code == 200 and r.headers["x-nexus-backend-type"] == "cloud"
        time.sleep(0.5)
        stats = httpx.get(f"http://127.0.0.1:{stack.admin_port}/v1/stats", timeout=5, headers=admin_headers()).json()
        assert stats["budget"]["current_spending_usd"] > 0
        cfg = (stack.workdir / "envoy.yaml").read_text()
        assert f"path: {sock}" in cfg and "pipe:" in cfg
    finally:
        stack.stop()


def test_a_client_hanging_up_at_done_is_still_settled_from_the_providers_usage(e2e):
    """A client that closes as soon as it reads `data: [DONE]` (as the SDKs do): Envoy read the usage event before
    it, so the access log has the usage and the request settles exactly."""
    rids = []
    exact = _exact_settlements(e2e)
    for _ in range(5):
        with httpx.stream("POST", e2e.url + "/v1/chat/completions", timeout=10,
                          json={"model": "gpt-4o", "messages": MSGS, "max_tokens": 3, "stream": True}) as r:
            rids.append(r.headers["x-nexus-request-id"])
            for line in r.iter_lines():
                if line.strip() == "data: [DONE]":
                    break  # hang up now, before the stream's end
    logged = _logged_usage(e2e, rids)
    assert sorted(logged) == sorted(rids) and all(u["completion_tokens"] == 3 for u in logged.values())
    for _ in range(50):
        if _exact_settlements(e2e) - exact >= 5:
            break
        time.sleep(0.1)
    assert _exact_settlements(e2e) - exact >= 5
