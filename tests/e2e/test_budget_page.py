"""The budget page (/ui) in a real browser against the running stack: Debian's Chromium, driven over the
DevTools protocol (aiohttp's WebSocket client: no Selenium or driver binary needed). The figures it shows must
equal /v1/stats, it must update live from /v1/events when spend changes, and it must never show prompt text.
A screenshot is saved to build/test-artifacts/budget-page.png."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from nexus_dev.stack import REPO, admin_headers
from tests.e2e.conftest import E2E

TOKEN = "page-test-token"
MARKER = "PROMPT-MARKER-7f3a"
ARTIFACTS = REPO / "build" / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--remote-debugging-port=0", "--window-size=1280,1500"]


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("NEXUS_REQUIRE_TOOLS") == "1":
            pytest.fail("chromium is not installed")
        pytest.skip("chromium not installed (.ci/run installs Debian's chromium)")
    return binary


class Browser:
    """One headless Chromium and one page, over the DevTools protocol."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="nexus-chromium-")
        self.proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        end = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert self.proc.poll() is None, "chromium exited"
            assert time.monotonic() < end, "chromium did not open its DevTools port in 30 s"
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        self._id = 0

    async def connect(self) -> None:
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as r:
            pages = [t for t in await r.json() if t["type"] == "page"]
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=64 << 20)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        my = self._id
        await self.ws.send_json({"id": my, "method": method, "params": params})
        while True:
            msg = json.loads((await asyncio.wait_for(self.ws.receive(), 30)).data)
            if msg.get("id") == my:
                assert "error" not in msg, msg
                return dict(msg.get("result", {}))

    async def js(self, expr: str) -> Any:
        out = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return out["result"].get("value")

    async def wait_for(self, expr: str, within: float = 20) -> Any:
        end = time.monotonic() + within
        while time.monotonic() < end:
            v = await self.js(expr)
            if v:
                return v
            await asyncio.sleep(0.2)
        raise AssertionError(f"never true in the page: {expr}")

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def live(e2e: E2E, tmp_path_factory):
    os.environ["NEXUS_ADMIN_TOKEN"] = TOKEN
    path = tmp_path_factory.mktemp("page") / "ledger.db"
    e2e.restart(budgets=[{"name": "global", "limit_usd": 0.01, "soft_limit_percent": 50},
                         {"name": "team", "scope": {"team": "*"}, "limit_usd": 0.002, "period": "daily"},
                         {"name": "burst", "period": {"rolling": "1h"}, "limit_usd": 1},
                         {"name": "tok", "limit_tokens": 100_000}],
                store={"kind": "sqlite", "path": str(path)},
                identity={"trust_identity_headers": True, "trust_attribution_headers": True})
    for team, task, model in [("search", "triage", "gpt-4o"), ("search", "triage", "gpt-4o"),
                              ("ads", "summarise", "gpt-4o-mini"), ("ads", "nightly", "gpt-4o")]:
        agent = {"x-nexus-agent": "triager"} if task == "triage" else {}
        r = httpx.post(f"{e2e.url}/v1/chat/completions", timeout=15,
                       headers={"x-nexus-team": team, "x-nexus-task": task, "authorization": "Bearer sk-test", **agent},
                       json={"model": model, "messages": [{"role": "user", "content": f"{MARKER} hello"}],
                             "max_tokens": 5})
        assert r.status_code == 200, r.text
    time.sleep(0.5)
    return e2e


def usd4(v: float) -> str:
    return f"${v:.4f}"


async def stats(live: E2E) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"http://127.0.0.1:{live.stack.admin_port}/v1/stats", headers=admin_headers(TOKEN), timeout=5)
        return dict(r.json())


async def test_the_page_shows_what_stats_says_and_updates_live(live: E2E):
    before_doc = await stats(live)
    b = Browser()
    try:
        await b.connect()
        await b.call("Page.enable")
        await b.call("Page.navigate", url=f"http://127.0.0.1:{live.stack.admin_port}/ui#token={TOKEN}")
        await b.wait_for("document.body.dataset.ready === '1' && "
                         "document.querySelectorAll('[data-testid=budget]').length >= 2")
        shown = await b.js("""Object.fromEntries([...document.querySelectorAll('[data-testid=budget]')].map(s => [
            s.dataset.budget, {spent: s.querySelector('[data-testid=spent]').textContent,
                               status: s.querySelector('[data-testid=status]').textContent,
                               util: Number(s.querySelector('[data-testid=gauge]').dataset.utilization)}]))""")
        for doc in before_doc["budgets"]:
            got = shown[doc["name"]]
            want = (f"{doc['current_tokens']:,} tokens" if doc["unit"] == "tokens"
                    else usd4(doc["current_spending_usd"]))
            assert got["spent"] == want, (doc["name"], got)
            assert got["status"] == doc["status"] and got["util"] == doc["utilization_percent"]
        # A rolling window shows its span; a token budget its tokens (it has spent some: the requests above).
        window = await b.js("document.querySelector('[data-testid=window][data-budget=burst]').textContent")
        # The window moves every 5 minutes: the page shows what stats said just before or just after it loaded.
        spans = {f"rolling 1h: {w['start'][11:16]}Z–{w['end'][11:16]}Z"
                 for w in (next(d for d in doc["budgets"] if d["name"] == "burst")["window"]
                           for doc in (before_doc, await stats(live)))}
        assert window in spans, (window, spans)
        assert shown["tok"]["spent"].endswith(" tokens") and shown["tok"]["spent"] != "0 tokens"
        await b.wait_for("document.querySelectorAll('[data-testid=row-team]').length >= 2")
        teams = await b.js("[...document.querySelectorAll('[data-testid=row-team]')].map(r => r.dataset.key).sort()")
        assert teams == ["ads", "search"]
        tasks = await b.js("[...document.querySelectorAll('[data-testid=row-task]')].map(r => r.dataset.key).sort()")
        assert tasks == ["nightly", "summarise", "triage"]
        agents = await b.js("[...document.querySelectorAll('[data-testid=row-agent]')].map(r => r.dataset.key).sort()")
        assert agents == ["(none)", "triager"]
        instances = await b.js("document.querySelector('[data-testid=budget][data-budget=team] table').innerText")
        assert "search" in instances and "ads" in instances  # the per-team instances table
        assert MARKER not in await b.js("document.documentElement.outerHTML")
        assert "sk-test" not in await b.js("document.documentElement.outerHTML")
        # Live: new spend appears without a reload, through /v1/events.
        await b.wait_for("document.getElementById('live').textContent === 'live'")
        before = shown["global"]["spent"]
        async with httpx.AsyncClient() as c:
            r = await c.post(f"{live.url}/v1/chat/completions", timeout=15, headers={"authorization": "Bearer sk"},
                             json={"model": "gpt-4o", "messages": [{"role": "user", "content": "again"}],
                                   "max_tokens": 5})
        assert r.status_code == 200
        now = await b.wait_for(f"""(() => {{ const t = document.querySelector('[data-testid=spent][data-budget=global]')
            .textContent; return t !== {json.dumps(before)} ? t : null; }})()""", within=15)
        after = await stats(live)
        assert now == usd4(after["budget"]["current_spending_usd"])
        await b.call("Emulation.setDeviceMetricsOverride", width=1280, height=1500, deviceScaleFactor=1, mobile=False)
        await asyncio.sleep(0.5)
        shot = await b.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        png = base64.b64decode(shot["data"])
        (ARTIFACTS / "budget-page.png").write_bytes(png)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    finally:
        await b.close()


async def test_the_page_asks_for_the_token_and_shows_nothing_without_it(live: E2E):
    b = Browser()
    try:
        await b.connect()
        await b.call("Page.navigate", url=f"http://127.0.0.1:{live.stack.admin_port}/ui")
        await b.wait_for("document.getElementById('login').classList.contains('show')")
        assert await b.js("document.querySelectorAll('[data-testid=budget]').length") == 0
    finally:
        await b.close()
