"""FinOps through the real Envoy: task and tag attribution in reports and the FOCUS export, budgets per distinct
team, budgets created and deleted at runtime from the CLI, the admin listener's token and rate limit, and the
forecast, alert and recommendation commands."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from nexus_dev.stack import admin_headers
from tests.e2e.conftest import E2E

TOKEN = "finops-test-token"
MSGS = [{"role": "user", "content": "Hello"}]
# A gpt-4o request here costs ~$0.00014 settled (reserved at max_tokens): $0.0005 holds about three.
BUDGETS = [
    {"name": "global", "limit_usd": 100},
    {"name": "team", "scope": {"team": "*"}, "limit_usd": 0.0005, "hard_limit_action": "block_all",
     "max_instances": 3, "alert_thresholds": [50, 100]},
]


@pytest.fixture(scope="module")
def live(e2e: E2E, tmp_path_factory):
    os.environ["NEXUS_ADMIN_TOKEN"] = TOKEN
    path = tmp_path_factory.mktemp("finops") / "ledger.db"
    e2e.restart(budgets=BUDGETS, store={"kind": "sqlite", "path": str(path)},
                identity={"trust_identity_headers": True, "trust_attribution_headers": True},
                admin_api={"rate_limit_per_second": 5, "rate_limit_burst": 40})
    return e2e


def cli(live: E2E, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nexus_extproc", *args, "--admin",
                           f"127.0.0.1:{live.stack.admin_api_port}"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NEXUS_ADMIN_TOKEN": TOKEN})


def admin(live: E2E, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{live.stack.admin_port}{path}", headers=admin_headers(TOKEN), timeout=10)


def chat(live: E2E, **headers: str) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS, "max_tokens": 5},
                      headers={"authorization": "Bearer sk-test", **headers}, timeout=15)


def test_task_and_tags_reach_reports_and_the_focus_export(live: E2E):
    for _ in range(2):
        r = chat(live, **{"x-nexus-team": "alpha", "x-nexus-task": "triage", "x-nexus-tags": "team-a, env=prod"})
        assert r.status_code == 200, r.text
    r = chat(live, **{"x-nexus-team": "alpha", "x-nexus-task": "summarise"})
    assert r.status_code == 200
    time.sleep(0.5)
    rows = admin(live, "/v1/spend?group_by=budget,task,tag").json()["rows"]
    by = {(row["task"], row["tag"]): row for row in rows if row["budget"] == "global"}  # each once
    assert by[("triage", "env=prod")]["requests"] == 2 and by[("triage", "team-a")]["requests"] == 2
    assert by[("summarise", "")]["requests"] == 1
    # The FOCUS export counts each settlement once, whatever budgets it fell under.
    out = cli(live, "export")
    assert out.returncode == 0, out.stderr
    focus = list(csv.DictReader(io.StringIO(out.stdout)))
    triage = [f for f in focus if f["x_Task"] == "triage"]
    assert {f["x_TokenType"] for f in triage} == {"input", "output"}
    assert {f["SubAccountId"] for f in triage} == {"alpha"} and {f["ResourceId"] for f in triage} == {"gpt-4o"}
    assert json.loads(triage[0]["Tags"]) == {"env": "prod", "team-a": "", "x_nexus_task": "triage"}
    billed = sum(round(float(f["BilledCost"]) * 1e6) for f in focus)
    settled = round(admin(live, "/v1/stats").json()["budget"]["current_spending_usd"] * 1e6)
    assert billed == settled  # the global budget counted every request once


def test_a_bad_tag_header_gets_a_400_in_the_clients_shape(live: E2E):
    r = chat(live, **{"x-nexus-tags": "fine,not fine"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "not fine" not in r.text
    a = httpx.post(f"{live.url}/v1/messages", headers={"x-api-key": "sk-ant", "anthropic-version": "2023-06-01",
                                                       "x-nexus-task": "x" * 65},
                   json={"model": "claude-3-5-haiku-latest", "max_tokens": 5, "messages": MSGS}, timeout=15)
    assert a.status_code == 400 and a.json()["type"] == "error"


def test_each_team_gets_its_own_budget_up_to_max_instances(live: E2E):
    codes = [chat(live, **{"x-nexus-team": "beta"}).status_code for _ in range(8)]
    assert codes[0] == 200 and 503 in codes  # beta's own $0.0005 runs out
    assert chat(live, **{"x-nexus-team": "gamma"}).status_code == 200  # beta's refusals are beta's
    # alpha, beta and gamma are the three instances: a fourth team shares the overflow budget
    delta = chat(live, **{"x-nexus-team": "delta"})
    assert delta.status_code == 200
    time.sleep(0.3)
    team = next(b for b in admin(live, "/v1/stats").json()["budgets"] if b["name"] == "team")
    assert team["distinct"]["instances"] == 3 and team["distinct"]["max_instances"] == 3
    names = {i["name"] for i in team["distinct"]["top"]}
    assert names == {"team/alpha", "team/beta", "team/gamma"}
    beta = next(i for i in team["distinct"]["top"] if i["name"] == "team/beta")
    assert beta["status"] in ("SoftLimit", "HardLimit") and beta["utilization_percent"] >= 50  # refused: no room
    assert team["distinct"]["overflow_spending_usd"] > 0  # delta's request
    # per-team figures never become metric labels
    assert "team/beta" not in live.metrics()


def test_runtime_budget_from_the_cli_applies_at_once_and_goes_away(live: E2E):
    r = cli(live, "create-budget", "ml-cap", "0.0001", "--scope", "team=ml", "--hard-limit-action", "block_all",
            "--period", "daily", "--actor", "ci")
    assert r.returncode == 0, r.stderr
    codes = [chat(live, **{"x-nexus-team": "ml"}).status_code for _ in range(3)]
    assert 503 in codes
    doc = next(b for b in admin(live, "/v1/stats").json()["budgets"] if b["name"] == "ml-cap")
    assert doc["origin"] == "runtime" and doc["active"] is True
    assert cli(live, "set-active", "ml-cap", "off", "--actor", "ci").returncode == 0
    assert chat(live, **{"x-nexus-team": "ml"}).status_code == 200  # tracked, not enforced
    r = cli(live, "delete-budget", "global", "--actor", "ci")
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr
    assert cli(live, "delete-budget", "ml-cap", "--actor", "ci").returncode == 0
    assert "ml-cap" not in {b["name"] for b in admin(live, "/v1/stats").json()["budgets"]}
    r = cli(live, "status", "--format", "json")
    assert "ml-cap" not in r.stdout


def test_a_rolling_session_token_budget_from_the_cli(live: E2E):
    """The agent-era budgets at runtime: a rolling window, per session, in tokens, with a model allowlist."""
    r = cli(live, "create-budget", "agent-burst", "--limit-tokens", "40", "--period", "rolling 15m",
            "--scope", "session=*", "--models", "gpt-4o", "--hard-limit-action", "block_all", "--actor", "ci")
    assert r.returncode == 0, r.stderr
    assert "created agent-burst: 40 tokens, period rolling 15m" in r.stdout
    doc = next(b for b in admin(live, "/v1/stats").json()["budgets"] if b["name"] == "agent-burst")
    assert doc["unit"] == "tokens" and doc["window"]["seconds"] == 900 and doc["scope"] == {"session": "*"}
    codes = [chat(live, **{"session-id": "loop-1"}).status_code for _ in range(4)]
    assert codes[0] == 200 and codes[-1] == 429, codes  # a short window's refusal
    assert chat(live, **{"session-id": "loop-2"}).status_code == 200  # another session has its own
    r = cli(live, "create-budget", "both", "1", "--limit-tokens", "5", "--actor", "ci")
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr
    assert cli(live, "delete-budget", "agent-burst", "--actor", "ci").returncode == 0


def test_forecast_alerts_and_recommendations_from_the_cli(live: E2E):
    r = cli(live, "forecast", "--budget", "global")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()[:2]
    assert header.split()[:3] == ["BUDGET", "TREND", "HISTORY_DAYS"] and row.split()[0] == "global"
    r = cli(live, "alerts", "--format", "json")
    alerts = json.loads(r.stdout)
    fired = [a for a in alerts if a["budget"] == "team/beta" and a["threshold"] == "50"]
    assert fired and all(a["delivery"] == "no_webhook" for a in fired)
    r = cli(live, "ack-alert", str(fired[0]["id"]), "--actor", "ci")
    assert r.returncode == 0 and "acknowledged by ci" in r.stdout
    assert json.loads(cli(live, "alerts", "--format", "json").stdout)[0]["id"] >= fired[0]["id"]
    r = cli(live, "recommend", "--format", "json")
    assert r.returncode == 0 and isinstance(json.loads(r.stdout), list)
    recs = admin(live, "/v1/recommendations").json()["recommendations"]
    assert isinstance(recs, list)


def test_admin_listener_needs_the_token_and_limits_the_rate(live: E2E):
    base = f"http://127.0.0.1:{live.stack.admin_port}"
    assert httpx.get(f"{base}/v1/stats", timeout=5).status_code == 401
    assert httpx.get(f"{base}/v1/spend", timeout=5).status_code == 401
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{base}/metrics", timeout=5).status_code == 200
    assert httpx.get(f"{base}/ui", timeout=5).status_code == 200
    codes = [httpx.get(f"{base}/v1/stats", headers={"Authorization": "Bearer guess"}, timeout=5).status_code
             for _ in range(60)]
    assert 429 in codes and codes.count(401) >= 40  # the burst, then refused before the token is checked
    assert admin(live, "/v1/stats").status_code == 200  # another credential has its own bucket
    with pytest.raises(openai.APIStatusError):
        pass_through = openai.OpenAI(base_url=f"{live.url}/v1", api_key="sk", max_retries=0)
        pass_through.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=5,  # type: ignore[arg-type]
                                             extra_headers={"x-nexus-tags": "a b"})


def test_admin_grpc_api_limits_the_rate_per_credential(live: E2E):
    import grpc

    from nexus_extproc.api import budget_admin_pb2 as pb
    from nexus_extproc.api import budget_admin_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{live.stack.admin_api_port}") as ch:
        stub = pb_grpc.BudgetAdminServiceStub(ch)
        codes = []
        for _ in range(60):
            try:
                stub.GetStatus(pb.GetStatusRequest(), metadata=(("authorization", "Bearer guess"),), timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK not in codes
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) >= 40  # the burst, then refused before the check
        ok = stub.GetStatus(pb.GetStatusRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5)
        assert ok.budgets  # the real token has its own bucket
