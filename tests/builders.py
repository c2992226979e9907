"""RequestStates built by the real phases, not by hand: request headers, then the body (parse, count, admit,
route, rewrite), then the response headers. Tests then drive the phase they are about."""

from __future__ import annotations

import json
from typing import Any

from nexus_extproc.request.pipeline import Processor, RequestState


def request_doc(path: str, model: str, stream: bool, **extra: Any) -> dict[str, Any]:
    if path == "/v1/responses":
        doc: dict[str, Any] = {"model": model, "input": "Hello there"}
    elif path == "/v1/completions":
        doc = {"model": model, "prompt": "Hello there"}
    elif path == "/v1/embeddings":
        doc = {"model": model, "input": "Hello there"}
    else:
        doc = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 64}
    if stream:
        doc["stream"] = True
    return {**doc, **extra}


async def admitted_state(processor: Processor, path: str, model: str, *, stream: bool = True,
                         status: int = 200, respond: bool = True, **extra: Any) -> RequestState:
    """A request that went through the request phases and got its response headers (SSE when `stream`)."""
    st = RequestState()
    r = processor.request_headers(st, {":method": "POST", ":path": path, "content-type": "application/json",
                                       "content-length": "1"}, False)
    assert r.immediate is None, r.immediate
    r = await processor.request_body(st, json.dumps(request_doc(path, model, stream, **extra)).encode())
    assert r.immediate is None, r.immediate
    await processor.forwarded(st)
    if not respond:  # the response never reaches the server (server.settlement: envoy)
        return st
    ctype = "text/event-stream" if stream else "application/json"
    processor.response_headers(st, {":status": str(status), "content-type": ctype})
    return st
