"""Issue 7: the budget filter dropped into an Envoy config that was not written for us
(envoy/examples/existing-mesh.yaml), routing by header match instead of cluster_header."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from nexus_dev.stack import HOST, REPO, Stack
from nexus_extproc.ledger import SpendRecord, open_ledger
from tests.e2e.conftest import E2E, write_config

MSGS = [{"role": "user", "content": "Hello"}]


def localize(doc: dict[str, Any], stack: Stack) -> dict[str, Any]:
    """Point the shipped example at this test's processes: addresses only, nothing else changes."""
    doc["admin"]["address"]["socket_address"] = {"address": HOST, "port_value": stack.envoy_admin_port}
    listener = doc["static_resources"]["listeners"][0]
    listener["address"]["socket_address"] = {"address": HOST, "port_value": stack.envoy_port}
    targets = {"nexus_extproc": stack.grpc_port, "openai": stack.fake_ports["openai"],
               "anthropic": stack.fake_ports["anthropic"], "ollama": stack.fake_ports["ollama"],
               "internal_api": stack.fake_ports["openai"]}
    for c in doc["static_resources"]["clusters"]:
        c["type"] = "STATIC"
        c.pop("dns_lookup_family", None)
        c.pop("transport_socket", None)  # the fakes speak plain HTTP
        ep = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        ep.update({"address": HOST, "port_value": targets[c["name"]]})
    return doc


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[E2E]:
    stack = Stack()
    try:
        stack.start_fakes()
        env = E2E(stack)
        stack.envoy_port = stack.envoy_admin_port = 0
        stack.envoy_port = stack.port()
        stack.envoy_admin_port = stack.port()
        stack.start_extproc(write_config(stack.workdir / "initial.yaml"))
        doc = localize(yaml.safe_load((REPO / "envoy/examples/existing-mesh.yaml").read_text()), stack)
        cfg = stack.workdir / "existing-mesh.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        stack.start_envoy_config(cfg)
        env.wait_envoy_sees_extproc()
        yield env
    finally:
        stack.stop()


def seed(path: Path, micros: int) -> None:
    import asyncio

    async def go() -> None:
        led = open_ledger("sqlite", path=str(path))
        period = time.strftime("%Y-%m", time.gmtime())
        rid = uuid.uuid4().hex
        await led.reserve(rid, [("global", period)], micros, time.time() + 60)
        await led.settle(rid, [("global", period)], micros, SpendRecord(time.time(), "x", "openai", 0, 0, 0, "usage"))
        await led.close()

    asyncio.run(go())


def test_normal_request_passes_every_filter_and_settles(mesh: E2E, tmp_path):
    mesh.restart(budget={"monthly_limit_usd": 100}, store={"kind": "sqlite", "path": str(tmp_path / "l.db")})
    raw = mesh.openai(default_headers={"x-nexus-upstream": "ollama"}).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSGS, max_tokens=4)
    assert raw.headers["x-fake-upstream"] == "openai"  # the client's own x-nexus-upstream was removed
    assert raw.headers["x-nexus-backend-type"] == "cloud" and float(raw.headers["x-nexus-cost-estimated"]) > 0
    seen = mesh.fake_requests("openai")[-1]
    assert "x-edge-seen" in {h.lower() for h in seen["headers"]}, seen["headers"]  # Lua ran before us
    time.sleep(0.3)
    assert mesh.stats()["budget"]["current_spending_usd"] > 0
    r = mesh.anthropic().messages.with_raw_response.create(model="claude-3-5-haiku", max_tokens=5, messages=MSGS)
    assert r.headers["x-fake-upstream"] == "anthropic" and r.headers["x-nexus-token-tier"] == "approximation"


def test_soft_limit_reroute_through_header_match_route(mesh: E2E, tmp_path):
    db = tmp_path / "l.db"
    seed(db, 90_000_000)
    mesh.restart(budget={"monthly_limit_usd": 100}, store={"kind": "sqlite", "path": str(db)})
    raw = mesh.openai().chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS, max_tokens=4)
    assert raw.headers["x-fake-upstream"] == "ollama" and raw.headers["x-fake-model"] == "llama3.1:8b"
    assert raw.headers["x-nexus-route-reason"] == "budget-soft-limit"


def test_hard_limit_503_in_existing_mesh(mesh: E2E, tmp_path):
    db = tmp_path / "l.db"
    seed(db, 100_000_000)
    mesh.restart(budget={"monthly_limit_usd": 100, "hard_limit_action": "block_cloud"},
                 store={"kind": "sqlite", "path": str(db)})
    with pytest.raises(openai.APIStatusError) as e:
        mesh.openai().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=4)
    assert e.value.status_code == 503 and e.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in e.value.response.headers and e.value.response.headers["x-nexus-budget-reset"]
    assert e.value.response.json()["error"]["code"] == "budget_exceeded"


def test_routes_with_processing_disabled_and_other_filters(mesh: E2E):
    r = httpx.get(mesh.url + "/v1/models", timeout=10)
    assert r.status_code == 200 and "x-nexus-cost-estimated" not in r.headers  # ext_proc disabled per route
    r = httpx.post(mesh.url + "/v1/chat/completions", headers={"host": "api.internal"}, timeout=10,
                   json={"model": "gpt-4o", "messages": MSGS})
    assert r.status_code == 200 and "x-nexus-backend-type" not in r.headers  # non-LLM virtual host
    assert httpx.get(mesh.url + "/admin/x", timeout=10).status_code == 403  # RBAC before us still applies


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_compressed_answers_settle_where_response_headers_reach_the_server(mesh: E2E, tmp_path, encoding):
    """Issue 26, the mesh shape (response headers sent to the server, as Istio and Envoy Gateway do): the
    provider compresses as the client allows, the client gets those bytes, the server reads a decoded copy."""
    mesh.restart(budget={"monthly_limit_usd": 100}, store={"kind": "sqlite", "path": str(tmp_path / "l.db")})
    # httpx decodes all three (the OpenAI SDK's own transport does not decode zstd, so it never asks for it).
    raw = httpx.post(mesh.url + "/v1/chat/completions", timeout=30,
                     json={"model": "gpt-4o", "messages": MSGS, "max_tokens": 20},
                     headers={"x-fake-encoding": encoding, "accept-encoding": f"{encoding}, gzip",
                              "x-fake-completion-tokens": "9"})
    assert raw.status_code == 200 and raw.headers["content-encoding"] == encoding
    usage = raw.json()["usage"]
    assert usage["completion_tokens"] == 9
    for _ in range(100):
        b = mesh.stats()["budget"]
        if b["current_spending_usd"] > 0 and b["reserved_usd"] == 0:
            break
        time.sleep(0.05)
    # gpt-4o: $2.50 in, $10 out per million: the provider's usage, not the 20-token reservation.
    assert b["current_spending_usd"] == pytest.approx((usage["prompt_tokens"] * 2.5 + 9 * 10) / 1e6, abs=2e-6)
    seen = mesh.fake_requests("openai")[-1]
    assert "x-nexus-upstream" not in seen["headers"]
