"""A replay upstream on 127.0.0.1: answers each request with a recorded exchange's status, content type and body.

The case is named by the `x-replay-case` request header. SSE bodies go out in several chunks, with a short
pause between them, so the filter sees a stream in pieces as it would from a provider.

`x-replay-encoding: gzip|deflate|br|zstd` compresses the answer as a provider does, when the request's
`accept-encoding` (what reached the upstream, not what the client sent) admits it: JSON whole, SSE as one
stream flushed per chunk. `/_replay/requests` records what each request asked for and what was sent.

    python -m tests.replay_upstream openai=PORT anthropic=PORT
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from nexus_dev.fakes.compress import accepts, stream_encoder
from tests.corpus import load_cases

CHUNKS = 5


def app() -> web.Application:
    cases = {c["name"]: c for c in load_cases()}
    seen: list[dict[str, object]] = []

    async def handle(req: web.Request) -> web.StreamResponse:
        body = await req.read()
        want = req.headers.get("x-replay-encoding", "")
        encoding = want if want and accepts(req.headers.get("accept-encoding", ""), want) else None
        seen.append({"path": req.path, "case": req.headers.get("x-replay-case"), "bytes": len(body),
                     "accept_encoding": req.headers.get("accept-encoding"), "sent_encoding": encoding,
                     "upstream_header": req.headers.get("x-nexus-upstream")})
        case = cases.get(req.headers.get("x-replay-case", ""))
        if case is None:
            return web.json_response({"error": "unknown replay case"}, status=404)
        raw = case["response_body"].encode()
        ctype = case["response_content_type"]
        headers = {"content-type": ctype}
        step_enc, finish = (stream_encoder(encoding) if encoding else ((lambda b: b), (lambda: b"")))
        if encoding:
            headers["content-encoding"] = encoding
        if "event-stream" not in ctype:
            return web.Response(body=step_enc(raw) + finish(), status=case["response_status"], headers=headers)
        resp = web.StreamResponse(status=case["response_status"], headers=headers)
        await resp.prepare(req)
        step = max(1, len(raw) // CHUNKS + 1)
        for i in range(0, len(raw), step):
            await resp.write(step_enc(raw[i:i + step]))
            await asyncio.sleep(0.005)
        await resp.write(finish())
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
