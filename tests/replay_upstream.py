"""A replay upstream on 127.0.0.1: answers each request with a recorded exchange's status, content type and body.

The case is named by the `x-replay-case` request header. SSE bodies go out in several chunks, with a short
pause between them, so the filter sees a stream in pieces as it would from a provider.

    python -m tests.replay_upstream openai=PORT anthropic=PORT
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from tests.corpus import load_cases

CHUNKS = 5


def app() -> web.Application:
    cases = {c["name"]: c for c in load_cases()}
    seen: list[dict[str, object]] = []

    async def handle(req: web.Request) -> web.StreamResponse:
        body = await req.read()
        seen.append({"path": req.path, "case": req.headers.get("x-replay-case"), "bytes": len(body)})
        case = cases.get(req.headers.get("x-replay-case", ""))
        if case is None:
            return web.json_response({"error": "unknown replay case"}, status=404)
        raw = case["response_body"].encode()
        ctype = case["response_content_type"]
        if "event-stream" not in ctype:
            return web.Response(body=raw, status=case["response_status"], headers={"content-type": ctype})
        resp = web.StreamResponse(status=case["response_status"], headers={"content-type": ctype})
        await resp.prepare(req)
        step = max(1, len(raw) // CHUNKS + 1)
        for i in range(0, len(raw), step):
            await resp.write(raw[i:i + step])
            await asyncio.sleep(0.005)
        await resp.write_eof()
        return resp

    async def requests(_: web.Request) -> web.Response:
        return web.json_response(seen)

    a = web.Application(client_max_size=64 << 20)
    a.router.add_get("/_replay/requests", requests)
    a.router.add_route("*", "/{tail:.*}", handle)
    return a


async def _main(ports: list[int]) -> None:
    runner = web.AppRunner(app(), access_log=None)
    await runner.setup()
    for p in ports:
        await web.TCPSite(runner, "127.0.0.1", p).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main([int(s.partition("=")[2]) for s in sys.argv[1:]]))
