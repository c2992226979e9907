"""The budget page (/ui: static HTML and one JS file, no build step) and the Server-Sent Events stream it
updates from (/v1/events: the /v1/stats document whenever it changes, as WatchStatus does for gRPC clients).
The page shows figures and names of budgets, models, teams and tasks only: no prompt, key or header text is
ever in what it reads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

MAX_EVENT_CLIENTS = 32
EVENT_INTERVAL_S = 1.0
HEARTBEAT_S = 15.0
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'")


def _asset(name: str) -> bytes:
    return resources.files("nexus_extproc.assets").joinpath("ui", name).read_bytes()


def add_ui_routes(app: web.Application, stats: Callable[[], Awaitable[dict[str, Any]]],
                  interval_s: float = EVENT_INTERVAL_S) -> None:
    page, script = _asset("index.html"), _asset("app.js")
    clients = 0

    async def index(_: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-store"})

    async def app_js(_: web.Request) -> web.Response:
        return web.Response(body=script, content_type="application/javascript", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def events(req: web.Request) -> web.StreamResponse:
        nonlocal clients
        if clients >= MAX_EVENT_CLIENTS:
            return web.json_response({"error": "too many event streams"}, status=503, headers={"Retry-After": "5"})
        clients += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        try:
            await resp.prepare(req)
            last, idle = "", 0.0
            while True:
                try:
                    doc = json.dumps(await stats(), sort_keys=True, separators=(",", ":"))
                except Exception:
                    doc = json.dumps({"error": "budget store unavailable"})
                if doc != last:
                    await resp.write(f"event: stats\ndata: {doc}\n\n".encode())
                    last, idle = doc, 0.0
                elif idle >= HEARTBEAT_S:
                    await resp.write(b": keep-alive\n\n")
                    idle = 0.0
                await asyncio.sleep(interval_s)
                idle += interval_s
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            clients -= 1
        return resp

    app.add_routes([web.get("/ui", index), web.get("/ui/", index), web.get("/ui/app.js", app_js),
                    web.get("/v1/events", events)])
