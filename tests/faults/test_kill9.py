"""kill -9 of the server while requests it forwarded are at the provider: the provider bills them, so the
ledger must too. After a restart on the same store, the reaper charges every forwarded reservation at its
estimate (source "reaped") once its TTL has passed."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import pytest

from tests.faults.conftest import E2E, ledger_spend, post, wait_for

ROUNDS = 5
PER_ROUND = 4
TTL = 5


def body(stream: bool) -> dict[str, object]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 40,
            "stream": stream}


@pytest.mark.parametrize("point", ["awaiting_response", "mid_sse"])
def test_kill9_charges_what_was_forwarded(e2e: E2E, tmp_path, point):
    db = tmp_path / "ledger.db"
    config = {"budget": {"monthly_limit_usd": 1000, "reconciliation_interval_secs": 1},
              "store": {"kind": "sqlite", "path": str(db), "reservation_ttl_secs": TTL,
                        "outbox_path": str(tmp_path / "outbox.jsonl")}}
    cfg = e2e.restart(**config)
    stream = point == "mid_sse"
    # awaiting_response: the fake holds its answer 3 s, the request sits at the provider when the server dies.
    # mid_sse: 40 events 100 ms apart, the server dies after the first ones reached the client.
    headers = {"x-fake-fault": "slow", "x-fake-delay-ms": "3000"} if not stream else {"x-fake-delay-ms": "100"}
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
            if stream:
                time.sleep(0.5)  # a few events have streamed
            else:
                time.sleep(0.3)  # the forwarded mark is written right after the body reply goes out
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
