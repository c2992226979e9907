"""Issue 27, streams settled by Envoy (server.settlement: envoy), through the real Envoy with the shared secret on
both gRPC streams: a stream settles exactly from Envoy's report, and a forged report (or a forged ext_proc
stream) from anyone without the secret is refused and moves nothing."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator

import anthropic
import grpc
import httpx
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2

from nexus_dev.stack import Stack
from tests.e2e.conftest import E2E, running, start_envoy_settled, write_config

pytestmark = pytest.mark.e2e
TOKEN = "envoy-shared-secret-for-tests"
MSGS = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> Iterator[E2E]:
    with running(Stack()) as stack:
        stack.start_fakes()
        d = tmp_path_factory.mktemp("fast")
        stack.start_extproc(write_config(d / "config.yaml", budget={"monthly_limit_usd": 1000},
                                         store={"kind": "sqlite", "path": str(d / "ledger.db")},
                                         server={"settlement": "envoy", "grace_period_secs": 5}),
                            env={"NEXUS_ENVOY_TOKEN": TOKEN})
        start_envoy_settled(stack, envoy_token=TOKEN)
        env = E2E(stack)
        env.wait_envoy_sees_extproc()
        yield env


def counter(e2e: E2E, name: str, labels: str) -> float:
    m = re.search(rf"^{name}{{{labels}}} ([0-9.e+]+)$", e2e.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def settled(e2e: E2E, before: float) -> float:
    for _ in range(200):
        b = e2e.stats()["budget"]
        if b["current_spending_usd"] != before and b["reserved_usd"] == 0:
            return b["current_spending_usd"] - before
        time.sleep(0.05)
    return e2e.stats()["budget"]["current_spending_usd"] - before


def forged_report(req_id: str) -> als_pb2.StreamAccessLogsMessage:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    md = entry.common_properties.metadata.filter_metadata
    md["nexus.extproc"].CopyFrom(struct_pb2.Struct(fields={"request_id": struct_pb2.Value(string_value=req_id)}))
    md["nexus.usage"].CopyFrom(struct_pb2.Struct(fields={
        "usage": struct_pb2.Value(string_value='{"input_tokens": 0, "output_tokens": 0}')}))
    entry.response.response_code.value = 200
    msg = als_pb2.StreamAccessLogsMessage()
    msg.http_logs.log_entry.append(entry)
    return msg


def send_forged(e2e: E2E, req_id: str, token: str | None) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{e2e.stack.grpc_port}") as ch:
        md = [("x-nexus-envoy-token", token)] if token else None
        try:
            als_pb2_grpc.AccessLogServiceStub(ch).StreamAccessLogs(iter([forged_report(req_id)]), metadata=md,
                                                                   timeout=5)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def test_a_stream_settles_from_envoys_report(fast: E2E):
    before = fast.stats()["budget"]["current_spending_usd"]
    reports = counter(fast, "nexus_envoy_reports_total", 'outcome="settled"')
    client = anthropic.Anthropic(base_url=fast.url, api_key="sk-ant-test", max_retries=0, timeout=30,
                                 default_headers={"x-fake-completion-tokens": "9", "x-fake-encoding": "gzip"})
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=50, messages=MSGS) as s:
        final = s.get_final_message()
    # claude-haiku-4-5: $1 in, $5 out per million tokens; the fake counts input as the API does.
    assert settled(fast, before) == pytest.approx((final.usage.input_tokens + 9 * 5) / 1e6, abs=2e-6)
    assert counter(fast, "nexus_envoy_reports_total", 'outcome="settled"') - reports == 1


@pytest.mark.parametrize("delay_ms", [0, 3])  # 3 ms: the fake's two halves of each event reach Envoy apart
def test_envoy_hides_the_usage_chunk_the_server_asked_for(fast: E2E, delay_ms: int):
    """The OpenAI SDK's default stream (no `include_usage`): the server asks the provider for usage, Envoy's
    sse_to_metadata reads it and the Lua filter (envoy/lua/hide_usage.lua) removes that chunk, so the stream takes
    the fast path (two ext_proc messages, none per chunk), the client gets exactly the events it asked for, and the
    request settles exactly from Envoy's report."""
    # The prompt as the provider counts it: the same request with the usage chunk asked for by the client.
    start = fast.stats()["budget"]["current_spending_usd"]
    asked = list(fast.openai().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=20, stream=True,
                                                       stream_options={"include_usage": True}))
    prompt = next(c.usage.prompt_tokens for c in asked if c.usage is not None)
    assert settled(fast, start) > 0  # that request's report is in before this one's counts start
    admin = fast.stack.envoy_admin_port
    before, msgs = fast.stats()["budget"]["current_spending_usd"], _ext_proc_messages(admin)
    reports = counter(fast, "nexus_envoy_reports_total", 'outcome="settled"')
    body = {"model": "gpt-4o", "messages": MSGS, "max_tokens": 20, "stream": True}
    with httpx.stream("POST", f"{fast.url}/v1/chat/completions", json=body, timeout=30,
                      headers={"authorization": "Bearer sk-test", "x-fake-completion-tokens": "7",
                               "x-fake-delay-ms": str(delay_ms)}) as r:
        assert r.status_code == 200
        raw = b"".join(r.iter_bytes())
    events = [e for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    docs = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(d["choices"] and d.get("usage") is None for d in docs)  # no usage chunk reached the client
    assert sum(1 for d in docs if d["choices"][0]["delta"].get("content")) == 7
    assert fast.fake_requests("openai")[-1]["stream_options"] == {"include_usage": True}  # asked for by us
    # gpt-4o: $2.50 in, $10 out per million tokens.
    assert settled(fast, before) == pytest.approx((prompt * 2.5 + 7 * 10) / 1e6, abs=2e-6)
    assert counter(fast, "nexus_envoy_reports_total", 'outcome="settled"') - reports == 1
    assert _ext_proc_messages(admin) - msgs == 2
    # The server waits for the ext_proc stream's end with no read in flight (grpc.aio leaks a read that a reset
    # cancels): that end still reaches it, and no stream stays open.
    for _ in range(50):
        if re.search(r"^nexus_streams_active 0\.0$", fast.metrics(), re.M):
            break
        time.sleep(0.1)
    assert re.search(r"^nexus_streams_active 0\.0$", fast.metrics(), re.M)


def test_forged_reports_are_refused_and_move_nothing(fast: E2E):
    """A client that knows its own X-Nexus-Request-Id sends a report of 0 tokens while its stream is running."""
    before = fast.stats()["budget"]["current_spending_usd"]
    refused = counter(fast, "nexus_unauthenticated_streams_total", 'service="access_log"')
    out: dict[str, bytes] = {}

    def slow_stream() -> None:
        with httpx.stream("POST", fast.url + "/v1/messages", timeout=30,
                          headers={"anthropic-version": "2023-06-01", "x-fake-completion-tokens": "20",
                                   "x-fake-delay-ms": "50"},
                          json={"model": "claude-haiku-4-5", "max_tokens": 50, "stream": True,
                                "messages": MSGS}) as r:
            out["req_id"] = r.headers["x-nexus-request-id"].encode()
            out["body"] = b"".join(r.iter_bytes())

    t = threading.Thread(target=slow_stream)
    t.start()
    for _ in range(200):
        if "req_id" in out:
            break
        time.sleep(0.01)
    rid = out["req_id"].decode()
    assert send_forged(fast, rid, None) == grpc.StatusCode.UNAUTHENTICATED
    assert send_forged(fast, rid, "a-guess") == grpc.StatusCode.UNAUTHENTICATED
    t.join(30)
    assert b"message_stop" in out["body"]
    assert counter(fast, "nexus_unauthenticated_streams_total", 'service="access_log"') - refused == 2
    # Envoy's own report settled it: the stream's real usage, not the forged 0 tokens.
    m = re.search(rb'"input_tokens": ?(\d+)', out["body"])
    assert m is not None
    assert settled(fast, before) == pytest.approx((int(m.group(1)) + 20 * 5) / 1e6, abs=2e-6)
    # Which entry wins: the first authenticated report. Even one with the secret, after it, moves nothing (the
    # request no longer waits; the ledger's settle is once per request id).
    spent = fast.stats()["budget"]["current_spending_usd"]
    assert send_forged(fast, rid, TOKEN) == grpc.StatusCode.OK
    time.sleep(0.3)
    assert fast.stats()["budget"]["current_spending_usd"] == spent


def test_a_forged_ext_proc_stream_is_refused(fast: E2E):
    with grpc.insecure_channel(f"127.0.0.1:{fast.stack.grpc_port}") as ch:
        msg = ep.ProcessingRequest()
        msg.request_headers.headers.headers.add(key=":path", value="/v1/messages")
        with pytest.raises(grpc.RpcError) as e:
            list(ep_grpc.ExternalProcessorStub(ch).Process(iter([msg]), timeout=5))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("per_worker", [True, False], ids=["logger-per-worker", "one-logger"])
def test_each_report_settles_whichever_worker_it_reaches(tmp_path, per_worker):
    """With several server processes, Envoy sends each report to the worker named in the request's metadata; with
    one logger for all (as in a mesh, where the access-log stream goes to any pod), the worker it reaches settles
    it from the request's snapshot. Either way every stream settles exactly once, and none waits out its time."""
    with running(Stack()) as stack:
        stack.start_fakes()
        stack.start_extproc(write_config(tmp_path / "config.yaml", budget={"monthly_limit_usd": 1000},
                                         store={"kind": "sqlite", "path": str(tmp_path / "ledger.db")},
                                         server={"settlement": "envoy", "envoy_report_wait_secs": 30}),
                            workers=2)
        start_envoy_settled(stack, workers=2, reports_per_worker=per_worker)
        e2e = E2E(stack)
        e2e.wait_envoy_sees_extproc()
        before = e2e.stats()["budget"]["current_spending_usd"]
        n = 12
        client = anthropic.Anthropic(base_url=e2e.url, api_key="sk-ant-test", max_retries=0, timeout=30)
        want = 0.0
        for _ in range(n):
            with client.messages.stream(model="claude-haiku-4-5", max_tokens=20, messages=MSGS,
                                        extra_headers={"x-fake-completion-tokens": "7"}) as s:
                final = s.get_final_message()
            want += (final.usage.input_tokens + 7 * 5) / 1e6  # claude-haiku-4-5: $1 in, $5 out per million

        def reports() -> float:
            # The admin port's metrics add up the workers' counters.
            return sum(counter(e2e, "nexus_envoy_reports_total", f'outcome="{o}"')
                       for o in ("settled", "settled_elsewhere"))
        for _ in range(100):  # well inside the 30 s a report may take before its stream settles without it
            if reports() >= n:
                break
            time.sleep(0.1)
        assert reports() == n
        assert counter(e2e, "nexus_envoy_reports_total", 'outcome="missing"') == 0
        elsewhere = counter(e2e, "nexus_envoy_reports_total", 'outcome="settled_elsewhere"')
        # One logger: its stream sits on one worker, the streams spread over both (least-request), so about half
        # the reports reach the worker that did not admit them (all 12 on one side: p ≈ 0.0005).
        assert elsewhere == 0 if per_worker else elsewhere > 0
        assert e2e.stats()["budget"]["current_spending_usd"] - before == pytest.approx(want, abs=1e-6 * n)


def test_a_visible_usage_chunk_lets_default_openai_streams_take_envoys_path(tmp_path):
    """The OpenAI SDK does not ask for stream usage by default. With server.stream_usage: visible the server
    asks for it and leaves the chunk in, so such a stream settles from Envoy's report with no chunk through the
    server, and the client sees one extra chunk with empty choices."""

    with running(Stack()) as stack:
        stack.start_fakes()
        stack.start_extproc(write_config(tmp_path / "config.yaml", budget={"monthly_limit_usd": 1000},
                                         store={"kind": "sqlite", "path": str(tmp_path / "ledger.db")},
                                         server={"settlement": "envoy", "stream_usage": "visible"}))
        start_envoy_settled(stack, stream_usage="visible")
        e2e = E2E(stack)
        e2e.wait_envoy_sees_extproc()
        client = e2e.openai(default_headers={"x-fake-completion-tokens": "6"})
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=20, stream=True))
        usage = next(c.usage for c in chunks if c.usage is not None)  # visible: the chunk the server asked for
        assert usage.completion_tokens == 6
        # gpt-4o: $2.50 in, $10 out per million tokens.
        assert settled(e2e, 0.0) == pytest.approx((usage.prompt_tokens * 2.5 + 6 * 10) / 1e6, abs=2e-6)
        assert counter(e2e, "nexus_envoy_reports_total", 'outcome="settled"') == 1
        assert e2e.fake_requests("openai")[-1]["stream_options"] == {"include_usage": True}  # asked for by us


def _ext_proc_messages(admin_port: int) -> int:
    text = httpx.get(f"http://127.0.0.1:{admin_port}/stats?filter=ext_proc.stream_msgs_received", timeout=5).text
    return sum(int(v) for k, _, v in (ln.partition(": ") for ln in text.splitlines()) if v.strip().isdigit())


def test_the_mesh_shape_settles_in_envoy_too(tmp_path):
    """Where ext_proc sees the response headers (Istio, Envoy Gateway: no route of ours), the server adds the
    X-Nexus-* headers there and turns the response body off for that request (mode_override), and
    settlement_filters() read it: three ext_proc messages for a JSON answer or a stream of any length, settled
    exactly from Envoy's report. A stream whose usage chunk the server hides still streams through it. The server
    keeps the default `settlement: auto`: this Envoy's ext_proc streams say it reads the responses."""
    with running(Stack()) as stack:
        stack.start_fakes()
        stack.start_extproc(write_config(tmp_path / "config.yaml", budget={"monthly_limit_usd": 1000},
                                         store={"kind": "sqlite", "path": str(tmp_path / "ledger.db")}))
        start_envoy_settled(stack, skip_response_headers=False, reports_per_worker=False)
        e2e = E2E(stack)
        e2e.wait_envoy_sees_extproc()
        admin = stack.envoy_admin_port
        reports = counter(e2e, "nexus_envoy_reports_total", 'outcome="settled"')

        before, msgs = e2e.stats()["budget"]["current_spending_usd"], _ext_proc_messages(admin)
        raw = e2e.openai().chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MSGS, max_tokens=20, extra_headers={"x-fake-completion-tokens": "11"})
        answer = raw.parse()
        assert raw.headers["x-nexus-backend-type"] == "cloud" and "x-nexus-cost-estimated" in raw.headers
        # gpt-4o: $2.50 in, $10 out per million tokens.
        assert settled(e2e, before) == pytest.approx((answer.usage.prompt_tokens * 2.5 + 11 * 10) / 1e6, abs=2e-6)
        assert _ext_proc_messages(admin) - msgs == 3

        before, msgs = e2e.stats()["budget"]["current_spending_usd"], _ext_proc_messages(admin)
        client = anthropic.Anthropic(base_url=e2e.url, api_key="sk-ant-test", max_retries=0, timeout=30,
                                     default_headers={"x-fake-completion-tokens": "40", "x-fake-encoding": "gzip"})
        with client.messages.stream(model="claude-haiku-4-5", max_tokens=60, messages=MSGS) as s:
            final = s.get_final_message()
        assert settled(e2e, before) == pytest.approx((final.usage.input_tokens + 40 * 5) / 1e6, abs=2e-6)
        assert _ext_proc_messages(admin) - msgs == 3  # 40 tokens, 40-odd chunks: none through the server
        assert counter(e2e, "nexus_envoy_reports_total", 'outcome="settled"') - reports == 2

        # The OpenAI SDK's default stream: the server asks for usage and hides it, so it reads this one itself.
        before = e2e.stats()["budget"]["current_spending_usd"]
        chunks = list(e2e.openai().chat.completions.create(
            model="gpt-4o", messages=MSGS, max_tokens=20, stream=True, extra_headers={"x-fake-completion-tokens": "6"}))
        assert chunks and all(c.choices for c in chunks)  # no usage-only chunk reached the client
        assert settled(e2e, before) > 0
        assert counter(e2e, "nexus_envoy_reports_total", 'outcome="settled"') - reports == 2

        # The same stream from a provider that compresses it although the server asked for identity: Envoy's
        # decompressors skip what the server reads (a decoded body would stall ext_proc: the client waited until
        # its timeout), so the provider's gzip reaches the server, which decodes its own copy and settles it
        # exactly; the client gets the provider's bytes as sent (their usage chunk included: not edited).
        before = e2e.stats()["budget"]["current_spending_usd"]
        rude = {"x-fake-completion-tokens": "6", "x-fake-encoding": "gzip",
                "x-fake-encoding-ignores": "accept-encoding"}
        r = httpx.post(e2e.url + "/v1/chat/completions", headers=rude, timeout=15, json={
            "model": "gpt-4o", "messages": MSGS, "max_tokens": 20, "stream": True})
        assert r.status_code == 200 and r.headers["content-encoding"] == "gzip" and r.text.endswith("[DONE]\n\n")
        usage = next(json.loads(line[6:])["usage"] for line in r.text.splitlines()
                     if line.startswith("data: {") and json.loads(line[6:]).get("usage"))
        assert settled(e2e, before) == pytest.approx(
            (usage["prompt_tokens"] * 2.5 + usage["completion_tokens"] * 10) / 1e6, abs=2e-6)
