"""kill -9 of the server while requests it forwarded are at the provider: the provider bills them, so the
ledger must too. After a restart on the same store, the reaper charges every forwarded reservation at its
estimate (source "reaped") once its TTL has passed."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import signal
import socket
import time

import httpx
import pytest

from tests.faults.conftest import E2E, ledger_spend, post, wait_for

ROUNDS = 3
PER_ROUND = 4
TTL = 5


def body(stream: bool) -> dict[str, object]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 40,
            "stream": stream}


POINTS = {
    # The fake holds its answer 1.5 s: the request sits at the provider when the server dies.
    "awaiting_response": {"x-fake-fault": "slow", "x-fake-delay-ms": "1500"},
    # The fake sends its headers (they pass through the filter), then the body 1.5 s later.
    "after_response_headers": {"x-fake-fault": "slow-body", "x-fake-delay-ms": "1500"},
    # 40 events 100 ms apart: the server dies after the first ones reached the client.
    "mid_sse": {"x-fake-delay-ms": "100"},
}


@pytest.mark.parametrize("point", list(POINTS))
def test_kill9_charges_what_was_forwarded(e2e: E2E, tmp_path, point):
    db = tmp_path / "ledger.db"
    config = {"budget": {"monthly_limit_usd": 1000, "reconciliation_interval_secs": 1},
              "store": {"kind": "sqlite", "path": str(db), "reservation_ttl_secs": TTL,
                        "outbox_path": str(tmp_path / "outbox.jsonl")}}
    cfg = e2e.restart(**config)
    stream = point == "mid_sse"
    headers = POINTS[point]
    sent = 0
    for _ in range(ROUNDS):
        before = len(e2e.fake_requests("openai"))
        with concurrent.futures.ThreadPoolExecutor(PER_ROUND) as pool:
            if stream:
                futs = [pool.submit(_stream_until_killed, e2e.url, headers) for _ in range(PER_ROUND)]
            else:
                futs = [pool.submit(post, e2e.url, "/v1/chat/completions", body(False), headers)
                        for _ in range(PER_ROUND)]
            wait_for(lambda b=before: len(e2e.fake_requests("openai")) - b >= PER_ROUND, 10,
                     "the requests to reach the provider")
            # The forwarded mark is written right after the body reply goes out; by 0.5 s a few events have
            # streamed, or the response headers have passed the filter.
            time.sleep(0.5)
            e2e.stack.stop_extproc(signal.SIGKILL)
            results = [f.result() for f in futs]
        assert all(r in (0, 500, 502, 503) or (stream and r == 200) for r in results), results
        sent += PER_ROUND
        e2e.stack.start_extproc(cfg)
        e2e.wait_envoy_sees_extproc()

    # Every forwarded request is settled once its reservation expires: none is released, none twice.
    aggs, count = wait_for(lambda: (lambda a: a if a[1] >= sent else None)(ledger_spend(db)), TTL + 20,
                           f"{sent} settlements")
    glob = [a for a in aggs if a.budget == "global"]
    assert count == sent
    assert sum(a.requests for a in glob) == sent
    reaped = sum(a.reaped for a in glob)
    assert reaped > 0 and reaped == sum(a.cost for a in glob)  # no usage was seen for any of them
    assert {a.model for a in glob} == {"gpt-4o"}
    stats = wait_for(lambda: (lambda b: b if b["reserved_usd"] == 0 else None)(e2e.stats()["budget"]), 10,
                     "reservations to clear")
    assert round(stats["current_spending_usd"] * 1e6) == sum(a.cost for a in glob)
    assert 'nexus_reaped_reservations_total{outcome="charged"}' in e2e.metrics()
    print(f"kill -9 at {point}: {sent} forwarded, {count} settled, {reaped} µ$ charged by the reaper")


def _stream_until_killed(url: str, headers: dict[str, str]) -> int:
    h = {"content-type": "application/json", "authorization": "Bearer sk-test", **headers}
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body(True), headers=h, timeout=30) as r:
            for _ in r.iter_bytes():
                pass
            return r.status_code
    except httpx.HTTPError:
        return 0


def test_kill9_before_forwarding_charges_nothing(e2e: E2E, tmp_path):
    """The server dies while Envoy is still buffering the request bodies: nothing reached the provider, so
    nothing is charged and nothing stays reserved."""
    db = tmp_path / "ledger.db"
    cfg = e2e.restart(budget={"monthly_limit_usd": 1000, "reconciliation_interval_secs": 1},
                      store={"kind": "sqlite", "path": str(db), "reservation_ttl_secs": TTL,
                             "outbox_path": str(tmp_path / "outbox.jsonl")})
    raw = json.dumps(body(False)).encode()
    host, port = e2e.url.removeprefix("http://").split(":")
    before = len(e2e.fake_requests("openai"))
    socks = []
    for _ in range(ROUNDS * PER_ROUND):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"authorization: Bearer sk-test\r\ncontent-length: %d\r\n\r\n" % len(raw) + raw[:20])
        socks.append(s)
    time.sleep(0.5)  # the request headers went through the filter; the bodies are still coming
    e2e.stack.stop_extproc(signal.SIGKILL)
    for s in socks:
        with contextlib.suppress(OSError):
            s.sendall(raw[20:])
    answers = []
    for s in socks:
        try:
            answers.append(s.recv(64).split(b" ")[1:2])
        except OSError:
            answers.append([b"0"])
        s.close()
    e2e.stack.start_extproc(cfg)
    e2e.wait_envoy_sees_extproc()
    time.sleep(TTL + 2)  # past any reservation's TTL, and a reconciler pass
    assert len(e2e.fake_requests("openai")) == before, "a request reached the provider without its filter"
    aggs, count = ledger_spend(db)
    assert count == 0 and not aggs
    assert e2e.stats()["budget"]["reserved_usd"] == 0
    print(f"kill -9 before forwarding: {len(socks)} requests, answers {sorted({a[0] for a in answers if a})}, "
          f"0 forwarded, 0 charged")


def test_sigstop_past_message_timeout_settles_each_request_once(e2e: E2E, tmp_path):
    """The server frozen for 2 × Envoy's message_timeout while its requests are at the provider: Envoy gives
    up on them; once the server runs again each one is settled exactly once (by the stream's end or by the
    reaper, never both)."""
    db = tmp_path / "ledger.db"
    e2e.restart(budget={"monthly_limit_usd": 1000, "reconciliation_interval_secs": 1},
                store={"kind": "sqlite", "path": str(db), "reservation_ttl_secs": TTL,
                       "outbox_path": str(tmp_path / "outbox.jsonl")})
    assert e2e.stack.extproc is not None
    n = 8
    before = len(e2e.fake_requests("openai"))
    headers = {"x-fake-fault": "slow", "x-fake-delay-ms": "1000"}
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futs = [pool.submit(post, e2e.url, "/v1/chat/completions", body(False), headers) for _ in range(n)]
        wait_for(lambda: len(e2e.fake_requests("openai")) - before >= n, 10, "the requests to reach the provider")
        time.sleep(0.3)
        e2e.stack.extproc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(10)  # message_timeout is 5 s
        finally:
            e2e.stack.extproc.send_signal(signal.SIGCONT)
        results = [f.result() for f in futs]
    e2e.wait_envoy_sees_extproc()
    aggs, count = wait_for(lambda: (lambda a: a if a[1] >= n else None)(ledger_spend(db)), TTL + 20,
                           f"{n} settlements")
    time.sleep(TTL + 2)  # a reaper pass after every TTL: it must find nothing more to charge
    aggs, count = ledger_spend(db)
    glob = [a for a in aggs if a.budget == "global"]
    assert count == n and sum(a.requests for a in glob) == n, (count, glob)
    assert e2e.stats()["budget"]["reserved_usd"] == 0
    print(f"SIGSTOP 10 s: answers {sorted(set(results))}, {n} forwarded, {count} settled once each, "
          f"{sum(a.reaped for a in glob)} µ$ by the reaper")
