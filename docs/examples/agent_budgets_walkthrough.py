"""Produces the "real output" in docs/budgets.md#budgets-for-agents: a rolling 15-minute budget, $0.002 per
client session, a model allowlist and runaway detection, through the real Envoy with the openai SDK.

Run: .venv/bin/python docs/examples/agent_budgets_walkthrough.py
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
s = Stack()
try:
    s.start_fakes()
    cfg = s.workdir / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "alerts": {"webhook_url": hook.url},
        "store": {"kind": "sqlite", "path": str(s.workdir / "l.db")},
        "backends": {
            "openai": {"cluster": "openai", "type": "cloud", "provider": "openai", "default": True,
                       "models": ["gpt-*"]},
            "anthropic": {"cluster": "anthropic", "type": "cloud", "provider": "anthropic", "default": True},
        },
        "budgets": [
            {"name": "global", "limit_usd": 5000, "models": ["gpt-4o", "gpt-4o-mini", "claude-*"]},
            {"name": "burst", "period": {"rolling": "15m"}, "limit_usd": 0.0015, "hard_limit_action": "block_all"},
            {"name": "per-session", "scope": {"session": "*"}, "period": "daily", "limit_usd": 0.002,
             "hard_limit_action": "block_all", "idle_ttl": "30m"},
        ],
        "runaway": {"enabled": True, "by": ["session"], "window": "5m", "baseline": "1h", "factor": 3,
                    "min_spend_usd": "0.0003", "min_peers": 2, "action": "throttle", "cooldown": "2m"},
    }))
    s.start_extproc(cfg)
    s.start_envoy()
    time.sleep(2.5)

    def ask(session: str, model: str = "gpt-4o") -> str:
        c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="sk-demo", max_retries=0,
                          default_headers={"session-id": session})
        try:
            c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Fix the test."}],
                                      max_tokens=10)
            time.sleep(0.2)
            return f"{session} {model}: 200"
        except openai.APIStatusError as e:
            keep = ("retry-after", "x-should-retry", "x-nexus-budget-reset")
            h = {k: e.response.headers[k] for k in keep if k in e.response.headers}
            return f"{session} {model}: {e.status_code} {json.dumps(h)} {e.response.text}"

    print("## allowlist")
    print(ask("s1", "gpt-4.1"))
    print("## two calm sessions, then one that loops")
    for sess in ("calm-a", "calm-b"):
        print(ask(sess))
    for _ in range(6):
        line = ask("loop")
        print(line)
        if ": 200" not in line:
            break
    print("## the rolling window")
    for i in range(8):
        line = ask(f"other-{i}")
        print(line)
        if ": 200" not in line:
            break
    stats = httpx.get(f"http://127.0.0.1:{s.admin_port}/v1/stats", timeout=5).json()
    for b in stats["budgets"]:
        keep = ("name", "period", "period_key", "window", "limit_usd", "current_spending_usd", "status")
        doc = {k: b.get(k) for k in keep}
        if b.get("distinct"):
            doc["distinct"] = {k: b["distinct"][k] for k in ("by", "instances", "max_instances")}
        print(json.dumps(doc))
    time.sleep(0.5)
    print("## webhook")
    for p in hook.received:
        if p.get("threshold") == "runaway":
            print(json.dumps(p))
finally:
    s.stop()
    hook.close()
