"""Produces the "real output" in docs/budgets.md#worked-example: a team budget and a per-agent daily budget,
through the real Envoy with the openai SDK, a local webhook receiver counting alerts.

Run: .venv/bin/python docs/examples/scoped_budgets_walkthrough.py
"""

import json
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))

import httpx
import openai
import yaml

from nexus_dev.fakes.webhook import WebhookReceiver
from nexus_dev.stack import Stack

hook = WebhookReceiver()
got = hook.received
s = Stack()
try:
    s.start_fakes()
    cfg = s.workdir / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "identity": {"trust_identity_headers": True},
                "alerts": {"webhook_url": hook.url},
                "store": {"kind": "sqlite", "path": str(s.workdir / "l.db")},
                "backends": {
                    "openai": {
                        "cluster": "openai",
                        "type": "cloud",
                        "provider": "openai",
                        "default": True,
                        "models": ["gpt-*"],
                    },
                    "anthropic": {"cluster": "anthropic", "type": "cloud", "provider": "anthropic", "default": True},
                    "ollama": {"cluster": "ollama", "type": "local", "provider": "openai", "models": ["llama3.1:8b"]},
                },
                "equivalents": {"gpt-4o-mini": "ollama/llama3.1:8b"},
                "prices": {"llama3.1:8b": {"input_per_mtok": 0, "output_per_mtok": 0}},
                "budgets": [
                    {"name": "global", "limit_usd": 5000},
                    {
                        "name": "team-ml",
                        "scope": {"team": "ml"},
                        "limit_usd": 0.0002,
                        "hard_limit_action": "block_cloud",
                        "alert_thresholds": [50, 80, 100],
                    },
                    {
                        "name": "agent-support-bot",
                        "scope": {"agent": "support-bot"},
                        "period": "daily",
                        "timezone": "Europe/Berlin",
                        "limit_usd": 0.0005,
                        "hard_limit_action": "block_all",
                    },
                ],
            }
        )
    )
    s.start_extproc(cfg)
    s.start_envoy()
    time.sleep(2.5)

    def client(**h):
        return openai.OpenAI(base_url=s.base_url + "/v1", api_key="sk-demo", max_retries=0, default_headers=h)

    out = []
    for _i in range(20):
        r = client(**{"x-nexus-team": "ml"}).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Summarise the incident report."}], max_tokens=20
        )
        out.append(
            {
                k: v
                for k, v in r.headers.items()
                if k.startswith("x-nexus-budget")
                or k in ("x-nexus-backend-type", "x-nexus-route-reason", "x-fake-upstream")
            }
        )
    for o in out:
        print("TEAM", json.dumps(o))
    for _i in range(4):
        try:
            client(**{"x-nexus-agent": "support-bot"}).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "Reply to ticket 4411."}], max_tokens=20
            )
            print("agent: 200")
        except openai.APIStatusError as e:
            print("agent:", e.status_code, e.response.headers.get("retry-after"), e.response.text)
    time.sleep(1.5)
    st = httpx.get(f"http://127.0.0.1:{s.admin_port}/v1/stats").json()
    print("STATS", json.dumps(st["budgets"][1:], indent=1))
    print("CSV\n" + httpx.get(f"http://127.0.0.1:{s.admin_port}/v1/spend?group_by=budget,model&format=csv").text)
    print("ALERTS", json.dumps(got, indent=1))
finally:
    s.stop()
