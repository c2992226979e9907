"""Issue 4 acceptance: the seeds' quickstart scenarios through the real Envoy, on SQLite and on Redis."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import UTC, datetime

import httpx
import openai
import pytest

from nexus_dev.stack import Stack, admin_headers
from nexus_extproc.ledger import SpendRecord, open_ledger
from nexus_extproc.ledger.outbox import decode
from tests.conftest import BACKENDS
from tests.e2e.conftest import E2E, write_config

MSGS = [{"role": "user", "content": "Hello"}]


def period() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def seed_spend(store: dict, micros: int) -> None:
    asyncio.run(_seed_spend(store, micros))


async def _seed_spend(store: dict, micros: int) -> None:
    """Spend recorded by earlier traffic, written through the ledger as a settled request."""
    led = (open_ledger("sqlite", path=store["path"]) if store["kind"] == "sqlite"
           else open_ledger("redis", url=store["url"], key_prefix=store["key_prefix"]))
    rid = uuid.uuid4().hex
    await led.reserve(rid, [("global", period())], micros, time.time() + 60)
    await led.settle(rid, [("global", period())], micros, SpendRecord(time.time(), "gpt-4o", "openai", 1, 1,
                                                                         micros, "usage"))
    await led.close()


def test_zero_config_has_no_budget(e2e: E2E):
    e2e.restart()
    raw = e2e.openai().chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS, max_tokens=2)
    assert not [h for h in raw.headers if h.startswith("x-nexus-budget")]
    stats = e2e.stats()
    assert stats["budget"] is None and set(stats) == {"budget", "calibration"}
    assert "nexus_budget_limit_usd" not in e2e.metrics()


def test_spend_is_recorded_exactly_and_stats_match_spec(e2e: E2E, store):
    e2e.restart(budget={"monthly_limit_usd": 100}, store=store)
    c = e2e.openai()
    r1 = c.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=10)
    r2 = c.chat.completions.create(model="gpt-4o-mini", messages=MSGS, max_tokens=4)
    expected = -(-(r1.usage.prompt_tokens * 25 + r1.usage.completion_tokens * 100) // 10) + \
        -(-(r2.usage.prompt_tokens * 15 + r2.usage.completion_tokens * 60) // 100)
    for _ in range(50):
        b = e2e.stats()["budget"]
        if b["reserved_usd"] == 0:
            break
        time.sleep(0.05)
    assert round(b["current_spending_usd"] * 1e6) == expected
    assert set(b) == {"current_spending_usd", "reserved_usd", "monthly_limit_usd", "utilization_percent", "status",
                      "billing_month", "last_reconciliation", "soft_limit_threshold", "hard_limit_action",
                      "next_reset_date"}
    assert b["status"] == "Normal" and b["billing_month"] == period() and b["hard_limit_action"] == "Warn"
    m = e2e.metrics()
    assert f'nexus_budget_limit_usd{{billing_month="{period()}",budget="global"}} 100.0' in m
    assert f'nexus_budget_status{{billing_month="{period()}",budget="global"}} 0.0' in m
    assert 'nexus_reconciler_duration_seconds_count{reconciler="BudgetReconciler"}' in m


def test_soft_limit_reroutes_to_local_equivalent(e2e: E2E, store):
    seed_spend(store, 85_000_000)
    e2e.restart(budget={"monthly_limit_usd": 100, "soft_limit_percent": 80}, store=store)
    raw = e2e.openai().chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS, max_tokens=3)
    h = raw.headers
    assert h["x-fake-upstream"] == "ollama" and h["x-fake-model"] == "llama3.1:8b"
    assert h["x-nexus-backend-type"] == "local" and h["x-nexus-route-reason"] == "budget-soft-limit"
    assert h["x-nexus-budget-status"] == "SoftLimit" and h["x-nexus-budget-utilization"] == "85.00"
    assert h["x-nexus-budget-remaining"] == "15.00"
    seen = e2e.fake_requests("ollama")[-1]
    assert "Authorization" not in seen["headers"]  # the cloud key never reaches the local model
    # The report counts what the reroute saved: gpt-4o-mini's price for the usage the local model reported.
    u = raw.parse().usage
    time.sleep(0.3)
    rows = httpx.get(f"http://127.0.0.1:{e2e.stack.admin_port}/v1/spend?group_by=model", timeout=5,
                     headers=admin_headers()).json()["rows"]
    local = next(r for r in rows if r["model"] == "llama3.1:8b")
    assert round(float(local["avoided_usd"]) * 1e6) == -(-(u.prompt_tokens * 15 + u.completion_tokens * 60) // 100)
    assert float(local["cost_usd"]) == 0
    # No equivalent for gpt-4o: it goes to the cloud as asked, with the status header.
    raw = e2e.openai().chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS, max_tokens=3)
    assert raw.headers["x-fake-upstream"] == "openai" and raw.headers["x-nexus-budget-status"] == "SoftLimit"


def test_hard_limit_block_cloud_routes_local_or_503(e2e: E2E, store):
    seed_spend(store, 100_000_000)
    e2e.restart(budget={"monthly_limit_usd": 100, "hard_limit_action": "block_cloud"}, store=store)
    raw = e2e.openai().chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS, max_tokens=3)
    assert raw.headers["x-fake-upstream"] == "ollama" and raw.headers["x-nexus-route-reason"] == "budget-hard-limit"
    with pytest.raises(openai.APIStatusError) as e:
        e2e.openai().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=3)
    resp = e.value.response
    assert resp.status_code == 503 and resp.headers["content-type"] == "application/json"
    assert resp.json()["error"]["code"] == "budget_exceeded"
    now = datetime.now(UTC)
    reset = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    # Weeks to the reset: no Retry-After for a client to sleep through (issue 26), the reset in its own header.
    assert "retry-after" not in resp.headers and resp.headers["x-should-retry"] == "false"
    assert resp.headers["x-nexus-budget-reset"] == reset.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert resp.json()["error"]["reset_at"] == resp.headers["x-nexus-budget-reset"]
    # Anthropic clients get Anthropic's error shape.
    r = httpx.post(e2e.url + "/v1/messages", json={"model": "claude-3-5-haiku", "max_tokens": 5,
                                                   "messages": MSGS}, timeout=10)
    assert r.status_code == 503 and r.json()["type"] == "error" and r.json()["error"]["type"] == "budget_exceeded"
    assert e2e.stats()["budget"]["status"] == "HardLimit"


def test_hard_limit_block_all_and_warn(e2e: E2E, store):
    seed_spend(store, 120_000_000)
    e2e.restart(budget={"monthly_limit_usd": 100, "hard_limit_action": "block_all"}, store=store,
                equivalents={})
    with pytest.raises(openai.APIStatusError) as e:
        e2e.openai().chat.completions.create(model="gpt-4o-mini", messages=MSGS, max_tokens=3)
    assert e.value.status_code == 503
    # block_all blocks every request, a local model priced at 0 included (seed quickstart).
    with pytest.raises(openai.APIStatusError) as e:
        e2e.openai().chat.completions.create(model="llama3.1:8b", messages=MSGS, max_tokens=3)
    assert e.value.status_code == 503 and e.value.response.headers["x-nexus-backend-type"] == "local"
    e2e.restart(budget={"monthly_limit_usd": 100, "hard_limit_action": "warn"}, store=store, equivalents={})
    raw = e2e.openai().chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS, max_tokens=3)
    assert raw.http_response.status_code == 200 and raw.headers["x-nexus-budget-status"] == "HardLimit"
    assert raw.headers["x-nexus-budget-remaining"] == "0.00"


def test_spend_survives_restart(e2e: E2E, store):
    e2e.restart(budget={"monthly_limit_usd": 50}, store=store)
    for _ in range(3):
        e2e.openai().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=20)
    time.sleep(0.3)
    before = e2e.stats()["budget"]["current_spending_usd"]
    assert before > 0
    e2e.restart(budget={"monthly_limit_usd": 50}, store=store)
    assert e2e.stats()["budget"]["current_spending_usd"] == before


def test_two_workers_share_one_budget(tmp_path, redis_url):
    for store in ({"kind": "sqlite", "path": str(tmp_path / "w.db")},
                  {"kind": "redis", "url": redis_url, "key_prefix": f"w{uuid.uuid4().hex[:6]}"}):
        stack = Stack()
        try:
            stack.start_fakes(("openai", "anthropic", "ollama"))
            cfg = write_config(stack.workdir / "c.yaml", budget={"monthly_limit_usd": 10}, store=store)
            stack.start_extproc(cfg, workers=2)
            stack.start_envoy(workers=2)
            env = E2E(stack)
            env.wait_envoy_sees_extproc()
            client = env.openai()
            total = 0
            for _ in range(12):
                r = client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=8)
                total += -(-(r.usage.prompt_tokens * 25 + r.usage.completion_tokens * 100) // 10)
            for _ in range(100):  # settlements run after the answer; a loaded machine takes longer than 0.3 s
                if round(env.stats()["budget"]["current_spending_usd"] * 1e6) == total:
                    break
                time.sleep(0.05)
            assert round(env.stats()["budget"]["current_spending_usd"] * 1e6) == total
            # Both worker processes served traffic (Envoy spreads streams over both ports).
            m = env.metrics()
            assert 'nexus_settlements_total{source="usage"} 12.0' in m
        finally:
            stack.stop()


def test_no_reroute_to_local_backend_envoy_reports_down(e2e: E2E, store):
    seed_spend(store, 90_000_000)
    backends = {**BACKENDS, "vllm": {"cluster": "vllm", "type": "local", "provider": "openai", "models": ["qwen*"]}}
    e2e.restart(budget={"monthly_limit_usd": 100}, store=store, backends=backends,
                equivalents={"gpt-4o-mini": "vllm/qwen2.5:7b"}, prices={"qwen2.5:7b": {"input_per_mtok": 0,
                                                                                       "output_per_mtok": 0}})
    time.sleep(1.5)  # Envoy's health check (1 s in tests) and the server's poll (0.5 s)
    raw = e2e.openai().chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS, max_tokens=3)
    assert raw.headers["x-fake-upstream"] == "openai" and raw.headers["x-nexus-budget-status"] == "SoftLimit"
    assert "x-nexus-route-reason" not in raw.headers


def test_sigterm_drains_in_flight_stream_and_settles(e2e: E2E, store):
    import threading

    e2e.restart(budget={"monthly_limit_usd": 100}, store=store)
    got: list[str] = []

    def slow_stream() -> None:
        stream = e2e.openai(default_headers={"x-fake-fault": "slow", "x-fake-delay-ms": "250"}) \
            .chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=8, stream=True)
        got.extend(c.choices[0].delta.content or "" for c in stream if c.choices)

    t = threading.Thread(target=slow_stream)
    t.start()
    time.sleep(0.8)
    assert e2e.stack.stop_extproc() == 0  # SIGTERM: waits for the stream, then exits 0
    t.join(30)
    assert "".join(got) == " ".join(["tok"] * 8)
    e2e.stack.start_extproc(write_config(
        e2e.stack.workdir / "after.yaml", budget={"monthly_limit_usd": 100}, store=store))
    b = e2e.stats()["budget"]
    assert b["current_spending_usd"] > 0 and b["reserved_usd"] == 0


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_down_gives_configured_outcome_within_timeout(e2e: E2E, tmp_path, mode):
    from nexus_dev.stack import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    outbox = tmp_path / "outbox.jsonl"
    e2e.restart(budget={"monthly_limit_usd": 100}, store_failure=mode,
                store={"kind": "redis", "url": dead, "timeout_ms": 200, "outbox_path": str(outbox)})
    t0 = time.monotonic()
    if mode == "closed":
        with pytest.raises(openai.APIStatusError) as e:
            e2e.openai().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=3)
        assert e.value.status_code == 503 and e.value.response.json()["error"]["code"] == "budget_store_unavailable"
    else:
        r = e2e.openai().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=3)
        assert r.choices
        for _ in range(50):  # the settlement is appended after the answer; the file may exist before it
            if outbox.exists() and outbox.read_bytes().strip():
                break
            time.sleep(0.05)
        entry = decode(outbox.read_bytes().splitlines()[0])
        assert entry is not None  # checksummed, whole
        assert entry["cost"] > 0 and entry["items"][0][0] == "global"  # spend kept for replay, not dropped
    assert time.monotonic() - t0 < 3
    assert re.search(r'nexus_store_failures_total\{operation="reserve"\} [1-9]', e2e.metrics())


def _rejected(e2e: E2E) -> float:
    m = re.search(r'^nexus_requests_total\{decision="rejected"\} ([0-9.e+]+)$', e2e.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def test_exhausted_budget_fails_the_anthropic_sdk_at_once(e2e: E2E, tmp_path):
    """Issue 26: the Anthropic SDK (and langchain-anthropic over it) sleeps for whatever Retry-After says; the
    month's reset made it sleep ~24 days. With its own default retries, it must now fail at once, having asked
    once: a refusal that would send it back for more is a refusal that can cost money."""
    import threading

    import anthropic

    store = {"kind": "sqlite", "path": str(tmp_path / "ledger.db")}
    seed_spend(store, 100_000_000)
    e2e.restart(budget={"monthly_limit_usd": 100, "hard_limit_action": "block_all"}, store=store)
    client = anthropic.Anthropic(base_url=e2e.url, api_key="sk-ant-test", timeout=30)  # default max_retries=2
    before = _rejected(e2e)
    out: list[BaseException] = []

    def call() -> None:
        try:
            client.messages.create(model="claude-3-5-haiku", max_tokens=5, messages=MSGS)
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=call, daemon=True)  # a sleeping SDK must not hold the test run open
    t.start()
    t.join(60)
    assert out, "the Anthropic SDK did not fail within 60 s (asleep on Retry-After?)"
    err = out[0]
    assert isinstance(err, anthropic.APIStatusError) and err.status_code == 503, err
    assert err.response.json()["error"]["type"] == "budget_exceeded"
    assert _rejected(e2e) - before == 1  # no retries
