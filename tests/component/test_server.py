"""The real gRPC server on an ephemeral port, fed the message sequences Envoy sends."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime

import grpc
import pytest

from nexus_extproc.app import build, start_grpc
from nexus_extproc.edge.extproc import ExternalProcessor
from tests.component.harness import Stream, body_msg, headers_msg, req_headers, set_headers
from tests.conftest import make_config
from tests.garbage import PATHS, garbage

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 20}


@pytest.fixture
async def served(counter, tmp_path):
    servers = []

    async def start(**cfg):
        cfg.setdefault("store", {"kind": "sqlite", "path": str(tmp_path / "ledger.db")})
        config = make_config(**cfg)
        comps = build(config, counter)
        servicer = ExternalProcessor(comps.processor, 30)
        server, port, _ = await start_grpc(servicer, "127.0.0.1", 0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        servers.append((server, channel))
        return comps, servicer, channel

    yield start
    for server, channel in servers:
        await channel.close()
        await server.stop(0)


async def test_chat_json_round_trip(served):
    comps, servicer, ch = await served()
    s = Stream(ch)
    r = await s.send(req_headers(extra={"x-nexus-upstream": "ollama", "x-nexus-budget-status": "Normal"}))
    assert set(r.request_headers.response.header_mutation.remove_headers) == {"x-nexus-upstream",
                                                                              "x-nexus-budget-status"}
    r = await s.send(body_msg(CHAT))
    common = r.request_body.response
    assert common.clear_route_cache
    assert set_headers(common.header_mutation)["x-nexus-upstream"] == "openai"
    assert not common.body_mutation.body  # nothing to rewrite
    meta = r.dynamic_metadata.fields["nexus.extproc"].struct_value.fields
    assert meta["decision"].string_value == "allowed" and meta["token_tier"].string_value == "exact"
    r = await s.send(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    h = set_headers(r.response_headers.response.header_mutation)
    assert h["x-nexus-backend-type"] == "cloud" and h["x-nexus-token-tier"] == "exact"
    assert float(h["x-nexus-cost-estimated"]) > 0
    assert not r.HasField("mode_override")
    r = await s.send(body_msg({"usage": {"prompt_tokens": 9, "completion_tokens": 20}}, response=True))
    meta = r.dynamic_metadata.fields["nexus.extproc"].struct_value.fields
    # 9 × $0.15/M + 20 × $0.60/M = 13.35 µ$ → 14 µ$ (rounded up)
    assert meta["cost_usd"].number_value == pytest.approx(0.000014)
    assert meta["settlement"].string_value == "usage"
    await s.close()


@pytest.mark.parametrize(("path", "body", "shape"), [
    ("/v1/chat/completions", b"{not json", "openai"),
    ("/v1/messages", b"{not json", "anthropic"),
    ("/v1/chat/completions", b'{"messages": []}', "openai"),
    ("/v1/chat/completions", b"\xff\xfe\x00garbage", "openai"),
    ("/v1/chat/completions", b"[1,2]", "openai"),
])
async def test_bad_bodies_get_400_in_provider_shape(served, path, body, shape):
    _, _, ch = await served()
    s = Stream(ch)
    await s.send(req_headers(path))
    r = await s.send(body_msg(body))
    im = r.immediate_response
    assert im.status.code == 400
    doc = json.loads(im.body)
    if shape == "anthropic":
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    else:
        assert doc["error"]["code"] == "invalid_request_error"


async def test_unknown_path_is_404_at_headers(served):
    _, _, ch = await served()
    r = await Stream(ch).send(req_headers("/v1/models"))
    assert r.immediate_response.status.code == 404


async def test_sse_response_switches_to_streamed_mode(served):
    _, _, ch = await served()
    s = Stream(ch)
    await s.send(req_headers())
    r = await s.send(body_msg({**CHAT, "stream": True}))
    body = json.loads(r.request_body.response.body_mutation.body)
    assert body["stream_options"] == {"include_usage": True}
    h = set_headers(r.request_body.response.header_mutation)
    assert h["content-length"] == str(len(r.request_body.response.body_mutation.body))
    r = await s.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    mo = r.mode_override
    assert mo.response_body_mode == mo.STREAMED and mo.request_header_mode == mo.SEND
    assert "content-length" in r.response_headers.response.header_mutation.remove_headers
    chunk = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    r = await s.send(body_msg(chunk, response=True, eos=False))
    assert not r.response_body.response.HasField("body_mutation")  # passed through untouched
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1}}\n\ndata: [DONE]\n\n'
    r = await s.send(body_msg(usage, response=True, eos=True))
    # The client did not ask for usage: the usage chunk is removed, [DONE] stays.
    assert r.response_body.response.body_mutation.body == b"data: [DONE]\n\n"


async def test_soft_limit_reroutes_and_rewrites_body(served):
    comps, _, ch = await served(budget={"monthly_limit_usd": 1, "soft_limit_percent": 50})
    led = comps.budget.ledger
    period = comps.budget.book.period().key
    await led.reserve("seed", [("global", period)], 600_000, 9e12)
    s = Stream(ch)
    await s.send(req_headers())
    r = await s.send(body_msg(CHAT))
    c = r.request_body.response
    h = set_headers(c.header_mutation)
    assert h["x-nexus-upstream"] == "ollama"
    assert json.loads(c.body_mutation.body)["model"] == "llama3.1:8b"
    assert h["content-length"] == str(len(c.body_mutation.body))
    assert "authorization" in c.header_mutation.remove_headers
    r = await s.send(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    h = set_headers(r.response_headers.response.header_mutation)
    assert h["x-nexus-backend-type"] == "local" and h["x-nexus-route-reason"] == "budget-soft-limit"
    assert h["x-nexus-budget-status"] == "SoftLimit" and h["x-nexus-budget-utilization"] == "60.00"
    assert h["x-nexus-budget-remaining"] == "0.40"


async def test_hard_limit_block_all_is_503_that_never_asks_a_client_to_sleep(served):
    comps, _, ch = await served(budget={"monthly_limit_usd": 1, "hard_limit_action": "block_all"})
    comps.budget.clock = lambda: datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
    await comps.budget.ledger.reserve("seed", [("global", "2026-11")], 1_000_000, 9e12)
    s = Stream(ch)
    await s.send(req_headers("/v1/messages"))
    r = await s.send(body_msg({"model": "claude-3-5-haiku", "max_tokens": 10,
                               "messages": [{"role": "user", "content": "hi"}]}))
    im = r.immediate_response
    assert im.status.code == 503
    h = set_headers(im.headers)
    # An hour to the reset is past the 60 s cap: no Retry-After (the Anthropic SDK would sleep through it),
    # a final answer instead, and the reset time in its own header and the body (issue 26).
    assert "retry-after" not in h and h["x-should-retry"] == "false" and h["content-type"] == "application/json"
    assert h["x-nexus-budget-reset"] == "2026-12-01T00:00:00Z"
    assert json.loads(im.body) == {"type": "error", "error": {"type": "budget_exceeded",
                                                               "message": "monthly budget exhausted",
                                                               "reset_at": "2026-12-01T00:00:00Z"}}
    # The filter's own 503 carries the headers a forwarded answer would (README "Response headers").
    assert h["x-nexus-budget-status"] == "HardLimit"
    assert h["x-nexus-budget-status"] == "HardLimit" and h["x-nexus-budget-name"] == "global"
    assert h["x-nexus-budget-remaining"] == "0.00" and h["x-nexus-budget-utilization"] == "100.00"
    assert float(h["x-nexus-cost-estimated"]) > 0 and h["x-nexus-token-tier"] == "approximation"
    assert h["x-nexus-backend-type"] == "cloud" and len(h["x-nexus-request-id"]) == 32


async def test_a_refused_body_gets_the_headers_that_apply(served):
    """A 400 for a body that could not be parsed: a request id, nothing that needs an estimate."""
    _, _, ch = await served(budget={"monthly_limit_usd": 1})
    s = Stream(ch)
    await s.send(req_headers())
    r = await s.send(body_msg(b'{"model": "gpt-4o", "messages": '))
    im = r.immediate_response
    h = set_headers(im.headers)
    assert im.status.code == 400 and len(h["x-nexus-request-id"]) == 32
    assert not {"x-nexus-cost-estimated", "x-nexus-token-tier", "x-nexus-budget-status"} & set(h)


async def test_cancelled_stream_still_settles_once(served):
    comps, servicer, ch = await served(budget={"monthly_limit_usd": 100})
    s = Stream(ch)
    await s.send(req_headers())
    await s.send(body_msg({**CHAT, "stream": True}))
    await s.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    await s.send(body_msg(b'data: {"choices":[{"delta":{"content":"hello world"}}]}\n\n', response=True, eos=False))
    s.cancel()  # client went away mid-stream; Envoy resets the gRPC stream
    for _ in range(100):
        if await comps.budget.ledger.settlement_count() == 1:
            break
        await asyncio.sleep(0.02)
    t = await comps.budget.ledger.totals("global", comps.budget.book.period().key)
    assert t.reserved == 0 and t.settled > 0
    assert await comps.budget.ledger.settlement_count() == 1


async def test_upstream_error_releases_reservation(served):
    comps, _, ch = await served(budget={"monthly_limit_usd": 100})
    s = Stream(ch)
    await s.send(req_headers())
    await s.send(body_msg(CHAT))
    await s.send(headers_msg({":status": "500", "content-type": "application/json"}, response=True))
    await s.send(body_msg({"error": {"message": "x"}}, response=True))
    await s.close()
    await asyncio.sleep(0.2)
    t = await comps.budget.ledger.totals("global", comps.budget.book.period().key)
    assert (t.settled, t.reserved) == (0, 0)


async def test_idle_stream_is_closed_and_a_busy_one_is_not(counter, tmp_path):
    """The server's own idle deadline (Envoy normally resets streams itself): a stream with no message for
    `stream_idle_timeout_secs` ends, counted; one that keeps sending outlives the timeout several times over."""
    from prometheus_client import REGISTRY

    from tests.conftest import make_config

    comps = build(make_config(store={"kind": "sqlite", "path": str(tmp_path / "l.db")}), counter)
    servicer = ExternalProcessor(comps.processor, 1.5)
    server, port, _ = await start_grpc(servicer, "127.0.0.1", 0)
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    def idle_closes() -> float:
        return REGISTRY.get_sample_value("nexus_stream_errors_total", {"phase": "idle_timeout"}) or 0.0

    try:
        before = idle_closes()
        busy, idle = Stream(ch), Stream(ch)
        await busy.send(req_headers())
        await idle.send(req_headers())
        t0 = asyncio.get_running_loop().time()
        for _ in range(10):  # 4 s of traffic, a message every 0.4 s: well past the 1.5 s timeout
            await asyncio.sleep(0.4)
            r = await busy.send(headers_msg({"x-keepalive": "1"}, response=True))
            assert r.HasField("response_headers")
        assert await asyncio.wait_for(idle.call.read(), 3) is grpc.aio.EOF  # the server ended it
        assert asyncio.get_running_loop().time() - t0 < 5
        assert idle_closes() == before + 1
        await busy.close()
    finally:
        await ch.close()
        await server.stop(0)


async def test_garbage_bodies_through_the_grpc_server_never_escape_as_errors(served):
    """What the Envoy fault test sends, without Envoy: every reply is a 4xx in the provider's shape or a
    request-body continue, and the stream never ends with a gRPC error."""
    _, servicer, ch = await served(budget={"monthly_limit_usd": 1000})
    rng = random.Random(1302)
    codes: list[int] = []
    for i in range(300):
        path = PATHS[i % len(PATHS)]
        s = Stream(ch)
        await s.send(req_headers(path))
        r = await s.send(body_msg(garbage(rng)))
        if r.HasField("immediate_response"):
            code = r.immediate_response.status.code
            assert 400 <= code < 500, (path, code, r.immediate_response.body[:200])
            doc = json.loads(r.immediate_response.body)
            assert "error" in doc
        else:
            assert r.HasField("request_body"), r
            code = 200
        codes.append(code)
        await s.close()
    assert sum(c >= 400 for c in codes) > 180


async def test_free_endpoints_pass_without_body_or_response(served):
    """Issue 26: count_tokens and reads are forwarded uncharged; the server asks Envoy for nothing more."""
    comps, _, ch = await served(budget={"monthly_limit_usd": 1})
    s = Stream(ch)
    r = await s.send(req_headers("/v1/messages/count_tokens?beta=true", extra={"anthropic-version": "2023-06-01"}))
    common = r.request_headers.response
    assert set_headers(common.header_mutation)["x-nexus-upstream"] == "anthropic" and common.clear_route_cache
    mo = r.mode_override
    assert mo.request_body_mode == mo.NONE and mo.response_body_mode == mo.NONE
    s = Stream(ch)
    r = await s.send(req_headers("/v1/models", extra={":method": "GET"}))
    assert set_headers(r.request_headers.response.header_mutation)["x-nexus-upstream"] == "openai"


async def test_websocket_upgrade_is_426_where_envoy_lets_it_through(served):
    """Istio and Envoy Gateway allow upgrades, so the server sees Codex's WebSocket attempt and answers the 426
    that makes it fall back to HTTP at once."""
    _, _, ch = await served()
    s = Stream(ch)
    r = await s.send(req_headers("/v1/responses", extra={":method": "GET", "upgrade": "websocket",
                                                         "connection": "Upgrade"}))
    assert r.immediate_response.status.code == 426
    assert json.loads(r.immediate_response.body)["error"]["type"] == "websocket_not_supported"


async def test_unknown_paths_pass_when_configured(served):
    _, _, ch = await served(server={"unknown_paths": "pass"})
    s = Stream(ch)
    r = await s.send(req_headers("/v1/messages/batches"))
    assert set_headers(r.request_headers.response.header_mutation)["x-nexus-upstream"] == "anthropic"
    assert r.mode_override.request_body_mode == r.mode_override.NONE
