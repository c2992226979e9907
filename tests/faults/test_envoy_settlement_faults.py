"""Issue 27, streams settled by Envoy (server.settlement: envoy): kill -9 of the server or of Envoy while such
streams run loses none of them. Each is settled exactly (Envoy's report reached a live server), at its estimate
(no report came: Envoy died), or by the reaper at its estimate (the server died holding it) — and only once."""

from __future__ import annotations

import concurrent.futures
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from nexus_dev.stack import Stack
from tests.e2e.conftest import E2E, running, start_envoy_settled, write_config
from tests.faults.conftest import ledger_spend, wait_for

N = 6
TTL = 5
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 40,
        "stream": True, "stream_options": {"include_usage": True}}  # the fast path: no chunk goes to the server


@pytest.fixture
def fast(tmp_path) -> Iterator[tuple[E2E, dict]]:
    with running(Stack()) as stack:
        stack.start_fakes()
        config = {"budget": {"monthly_limit_usd": 1000, "reconciliation_interval_secs": 1},
                  "store": {"kind": "sqlite", "path": str(tmp_path / "ledger.db"), "reservation_ttl_secs": TTL,
                            "outbox_path": str(tmp_path / "outbox.jsonl")},
                  "server": {"settlement": "envoy", "envoy_report_wait_secs": 2, "grace_period_secs": 5}}
        cfg = write_config(tmp_path / f"config-{uuid.uuid4().hex[:6]}.yaml", **config)
        stack.start_extproc(cfg)
        start_envoy_settled(stack)
        env = E2E(stack)
        env.wait_envoy_sees_extproc()
        yield env, {"cfg": cfg, "db": tmp_path / "ledger.db"}


def _stream(url: str) -> int:
    h = {"authorization": "Bearer sk-test", "x-fake-delay-ms": "100", "x-fake-completion-tokens": "30"}
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=BODY, headers=h, timeout=30) as r:
            for _ in r.iter_bytes():
                pass
            return r.status_code
    except httpx.HTTPError:
        return 0


def _run_and_kill(e2e: E2E, kill: str) -> list[int]:
    before = len(e2e.fake_requests("openai"))
    with concurrent.futures.ThreadPoolExecutor(N) as pool:
        futs = [pool.submit(_stream, e2e.url) for _ in range(N)]
        wait_for(lambda: len(e2e.fake_requests("openai")) - before >= N, 10, "the streams to reach the provider")
        time.sleep(0.5)  # a few events have streamed
        if kill == "server":
            e2e.stack.stop_extproc(signal.SIGKILL)
        else:
            assert e2e.stack.envoy is not None
            e2e.stack.envoy.send_signal(signal.SIGKILL)
            e2e.stack.envoy.wait()
        return [f.result() for f in futs]


def test_kill9_of_the_server_charges_every_forwarded_stream_once(fast):
    e2e, ctx = fast
    results = _run_and_kill(e2e, "server")
    e2e.stack.start_extproc(ctx["cfg"])
    e2e.wait_envoy_sees_extproc()
    aggs, count = wait_for(lambda: (lambda a: a if a[1] >= N else None)(ledger_spend(ctx["db"])), TTL + 20,
                           f"{N} settlements")
    time.sleep(TTL + 2)  # nothing is charged twice by a later reaper pass
    aggs, count = ledger_spend(ctx["db"])
    glob = [a for a in aggs if a.budget == "global"]
    assert count == N and sum(a.requests for a in glob) == N, (count, glob, results)
    assert e2e.stats()["budget"]["reserved_usd"] == 0
    print(f"envoy settlement, kill -9 of the server: answers {sorted(set(results))}, {N} forwarded, "
          f"{count} settled once each, {sum(a.reaped for a in glob)} µ$ by the reaper")


def test_kill9_of_envoy_settles_every_stream_at_its_estimate(fast):
    """Envoy dies with the streams: its reports die with it. The server's ext_proc streams end, wait
    envoy_report_wait_secs, and settle at the estimate they reserved."""
    e2e, ctx = fast
    results = _run_and_kill(e2e, "envoy")
    aggs, count = wait_for(lambda: (lambda a: a if a[1] >= N else None)(ledger_spend(ctx["db"])), 20,
                           f"{N} settlements")
    glob = [a for a in aggs if a.budget == "global"]
    assert count == N and sum(a.requests for a in glob) == N
    assert sum(a.cost for a in glob) == sum(a.estimate for a in glob)  # each at its estimate
    metrics = httpx.get(f"http://127.0.0.1:{e2e.stack.admin_port}/metrics", timeout=5).text
    assert f'nexus_envoy_reports_total{{outcome="missing"}} {float(N)}' in metrics
    assert e2e.stats()["budget"]["reserved_usd"] == 0
    print(f"envoy settlement, kill -9 of Envoy: answers {sorted(set(results))}, {N} settled at the estimate")
