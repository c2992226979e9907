"""Fake provider APIs that answer like the real ones, usage blocks included.

Usage is derived from the request: prompt tokens by the fake's own count (OpenAI chat format: 3 tokens per
message, 1 per name, 3 for the reply priming), completion = min(max tokens, N). Request headers steer it:
`x-fake-completion-tokens`, `x-fake-cached-tokens`, `x-fake-cache-write-tokens`, `x-fake-reasoning-tokens`,
`x-fake-delay-ms` (between stream events) and `x-fake-fault`: `truncate`, `500`, `500-mid-stream`, `slow`,
`slow-body` (headers, then the body after the delay), `malformed-sse`.

Like the real APIs (so that Claude Code and Codex run against the demo): tool definitions and tool calls/results
count toward input tokens; the Responses stream sends the full event sequence (`output_item.added`,
`content_part.added`, deltas, `.done` events, `response.completed`); Anthropic's `message_delta` repeats the input
usage; `count_tokens`, `/v1/responses/compact`, `GET /v1/models` and `HEAD /` answer. With `--compress` (the demo)
or `x-fake-encoding: gzip|br|zstd|deflate`, answers are compressed as the client's accept-encoding allows, SSE
flushed per event, as the Anthropic API does (`x-fake-encoding-ignores: accept-encoding`: whatever it allows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections import deque
from typing import Any

from aiohttp import web

from nexus_dev.fakes.compress import accepts, pick, stream_encoder
from nexus_extproc.metering.tokenizers import load_encoding

_ENC: dict[str, Any] = {}


def _enc(model: str) -> Any:
    name = "o200k_base" if model.startswith(("gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4")) else "cl100k_base"
    if name not in _ENC:
        _ENC[name] = load_encoding(name)
    return _ENC[name]


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


def _structured(value: Any) -> list[str]:
    """Tool schemas, tool calls and tool results as the providers tokenize them: their JSON text."""
    return [value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))] if value else []


def openai_chat_prompt_tokens(model: str, messages: list[dict[str, Any]], tools: Any = None) -> int:
    enc = _enc(model)
    n = 3
    for m in messages:
        n += 3
        for k in ("role", "name"):
            if isinstance(m.get(k), str):
                n += len(enc.encode_ordinary(m[k])) + (1 if k == "name" else 0)
        for t in _texts(m.get("content")) + _structured(m.get("tool_calls")) + _structured(m.get("arguments")) \
                + _structured(m.get("output")):
            n += len(enc.encode_ordinary(t))
    for t in _structured(tools):
        n += len(enc.encode_ordinary(t))
    return n


def plain_tokens(model: str, texts: list[str]) -> int:
    enc = _enc(model)
    return sum(len(enc.encode_ordinary(t)) for t in texts)


def _int_header(req: web.Request, name: str, default: int) -> int:
    try:
        return int(req.headers.get(name, default))
    except ValueError:
        return default


class FakeUpstream:
    def __init__(self, name: str, compress: bool = False) -> None:
        self.name = name
        self.compress = compress
        self.seen: deque[dict[str, Any]] = deque(maxlen=1000)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.add_routes([
            web.post("/v1/chat/completions", self.chat), web.post("/v1/completions", self.completions),
            web.post("/v1/responses", self.responses), web.post("/v1/embeddings", self.embeddings),
            web.post("/v1/messages", self.messages), web.get("/v1/models", self.models),
            web.post("/v1/messages/count_tokens", self.count_tokens),
            web.post("/v1/responses/compact", self.compact), web.head("/", self.root),
            web.get("/_fake/requests", self.requests),
        ])
        return app

    async def requests(self, _: web.Request) -> web.Response:
        return web.json_response(list(self.seen))

    async def root(self, _: web.Request) -> web.Response:
        return web.Response(status=200, headers={"x-fake-upstream": self.name})

    async def models(self, req: web.Request) -> web.Response:
        self.seen.append({"path": req.path, "method": req.method, "upstream": self.name})
        if self.name == "anthropic":
            data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-10-01T00:00:00Z"}
                    for m in ("claude-sonnet-4-5", "claude-haiku-4-5")]
            return web.json_response({"data": data, "has_more": False, "first_id": data[0]["id"],
                                      "last_id": data[-1]["id"]}, headers={"x-fake-upstream": self.name})
        ids = ["llama3.1:8b"] if self.name in ("ollama", "vllm") else ["gpt-4o", "gpt-4o-mini", "gpt-5"]
        return web.json_response({"object": "list", "data": [{"id": i, "object": "model", "owned_by": "fake"}
                                                             for i in ids]}, headers={"x-fake-upstream": self.name})

    def _encoding(self, req: web.Request) -> str | None:
        """The provider's choice: forced by x-fake-encoding, or with --compress its preference the client
        accepts; never one the request's accept-encoding refuses, unless the test says `x-fake-encoding-ignores:
        accept-encoding` (a provider or a CDN in front of it that compresses what it was asked not to)."""
        ae = req.headers.get("accept-encoding", "")
        want = req.headers.get("x-fake-encoding")
        if want:
            rude = req.headers.get("x-fake-encoding-ignores") == "accept-encoding"
            return want if rude or accepts(ae, want) else None
        return pick(ae) if self.compress else None

    async def _read(self, req: web.Request) -> dict[str, Any]:
        doc = await req.json()
        self.seen.append({"path": req.path, "model": doc.get("model"), "stream": doc.get("stream", False),
                          "stream_options": doc.get("stream_options"), "headers": sorted(req.headers.keys()),
                          "body_bytes": len(await req.read()), "upstream": self.name})
        return doc if isinstance(doc, dict) else {}

    def _headers(self, doc: dict[str, Any]) -> dict[str, str]:
        return {"x-fake-upstream": self.name, "x-fake-model": str(doc.get("model", ""))}

    @staticmethod
    def _completion_tokens(req: web.Request, cap: Any) -> int:
        n = _int_header(req, "x-fake-completion-tokens", 12)
        return min(n, cap) if isinstance(cap, int) else n

    async def _fault_json(self, req: web.Request) -> web.Response | None:
        fault = req.headers.get("x-fake-fault", "")
        if fault == "500":
            return web.json_response({"error": {"message": "upstream exploded", "type": "server_error"}},
                                     status=500)
        if fault == "slow":
            await asyncio.sleep(_int_header(req, "x-fake-delay-ms", 500) / 1000)
        return None

    async def _stream(self, req: web.Request, doc: dict[str, Any], events: list[bytes]) -> web.StreamResponse:
        fault = req.headers.get("x-fake-fault", "")
        delay = _int_header(req, "x-fake-delay-ms", 300 if fault == "slow" else 0) / 1000
        encoding = self._encoding(req)
        step, finish = stream_encoder(encoding) if encoding else ((lambda b: b), (lambda: b""))
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                           **self._headers(doc),
                                           **({"content-encoding": encoding} if encoding else {})})
        await resp.prepare(req)
        if fault == "truncate":
            events = events[: max(1, len(events) // 2)]
        for i, ev in enumerate(events):
            if fault == "malformed-sse" and i == 1:
                await resp.write(b"data: {not json\n\n")
            if fault == "500-mid-stream" and i == len(events) // 2:
                await asyncio.sleep(0.05)  # let what was written reach the proxy first
                raise ConnectionResetError("fake upstream failure mid-stream")
            # Write each event in two pieces to exercise split parsing downstream.
            cut = len(ev) // 2
            await resp.write(step(ev[:cut]))
            await resp.write(step(ev[cut:]))
            if delay:
                await asyncio.sleep(delay)
        if fault == "truncate":
            await asyncio.sleep(0.05)  # let what was written reach the proxy first
            if req.transport is not None:
                req.transport.close()
            return resp
        await resp.write(finish())
        await resp.write_eof()
        return resp

    @staticmethod
    def _sse(data: Any, event: str | None = None) -> bytes:
        head = f"event: {event}\n" if event else ""
        body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        return f"{head}data: {body}\n\n".encode()

    # ---- OpenAI ----------------------------------------------------------------------------------

    def _openai_usage(self, req: web.Request, prompt: int, completion: int, style: str) -> dict[str, Any]:
        cached = min(prompt, _int_header(req, "x-fake-cached-tokens", 0))
        reasoning = min(completion, _int_header(req, "x-fake-reasoning-tokens", 0))
        if style == "responses":
            return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                    "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
                    "total_tokens": prompt + completion}
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}

    async def chat(self, req: web.Request) -> web.StreamResponse:
        doc = await self._read(req)
        model = str(doc.get("model", ""))
        prompt = openai_chat_prompt_tokens(model, doc.get("messages") or [], doc.get("tools"))
        completion = self._completion_tokens(req, doc.get("max_completion_tokens", doc.get("max_tokens")))
        usage = self._openai_usage(req, prompt, completion, "chat")
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        words = ["tok"] * completion
        if doc.get("stream"):
            base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": "fp_fake"}
            evs = [self._sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})]
            for i, w in enumerate(words):
                evs.append(self._sse({**base, "choices": [{"index": 0, "delta": {"content": (" " if i else "")
                                                                                  + w},
                                                            "logprobs": None, "finish_reason": None}]}))
            evs.append(self._sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                        "finish_reason": "stop"}]}))
            opts = doc.get("stream_options") or {}
            if opts.get("include_usage"):
                evs.append(self._sse({**base, "choices": [], "usage": usage}))
            evs.append(self._sse("[DONE]"))
            return await self._stream(req, doc, evs)
        fault = await self._fault_json(req)
        if fault is not None:
            return fault
        body = {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words),
                                                     "refusal": None},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage, "system_fingerprint": "fp_fake"}
        return await self._json(req, body, doc)

    async def _json(self, req: web.Request, body: dict[str, Any], doc: dict[str, Any]) -> web.StreamResponse:
        raw = json.dumps(body).encode()
        fault = req.headers.get("x-fake-fault")
        if fault == "truncate":
            raw = raw[: len(raw) // 2]
        if fault == "slow-body":  # headers now, the body after the delay (a provider still generating)
            resp = web.StreamResponse(headers={**self._headers(doc), "content-type": "application/json"})
            resp.content_length = len(raw)
            await resp.prepare(req)
            await resp.write(raw[:10])
            await asyncio.sleep(_int_header(req, "x-fake-delay-ms", 500) / 1000)
            await resp.write(raw[10:])
            await resp.write_eof()
            return resp
        encoding = self._encoding(req)
        if encoding:
            step, finish = stream_encoder(encoding)
            return web.Response(body=step(raw) + finish(), content_type="application/json",
                                headers={**self._headers(doc), "content-encoding": encoding})
        return web.Response(body=raw, content_type="application/json", headers=self._headers(doc))

    async def completions(self, req: web.Request) -> web.StreamResponse:
        doc = await self._read(req)
        model = str(doc.get("model", ""))
        p = doc.get("prompt", "")
        prompt = plain_tokens(model, [p] if isinstance(p, str) else [x for x in p if isinstance(x, str)])
        completion = self._completion_tokens(req, doc.get("max_tokens", 16))
        usage = self._openai_usage(req, prompt, completion, "chat")
        base = {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()),
                "model": model}
        if doc.get("stream"):
            evs = [self._sse({**base, "choices": [{"text": " tok", "index": 0, "logprobs": None,
                                                    "finish_reason": None}]}) for _ in range(completion)]
            if (doc.get("stream_options") or {}).get("include_usage"):
                evs.append(self._sse({**base, "choices": [], "usage": usage}))
            evs.append(self._sse("[DONE]"))
            return await self._stream(req, doc, evs)
        fault = await self._fault_json(req)
        if fault is not None:
            return fault
        return await self._json(req, {**base, "choices": [{"text": " tok" * completion, "index": 0, "logprobs": None,
                                                     "finish_reason": "length"}], "usage": usage}, doc)

    @staticmethod
    def _responses_prompt(model: str, doc: dict[str, Any]) -> int:
        raw = doc.get("input")
        msgs = [{"role": "user", "content": raw}] if isinstance(raw, str) else [
            m for m in (raw or []) if isinstance(m, dict)]
        if isinstance(doc.get("instructions"), str):
            msgs.insert(0, {"role": "system", "content": doc["instructions"]})
        return openai_chat_prompt_tokens(model, msgs, doc.get("tools"))

    async def compact(self, req: web.Request) -> web.StreamResponse:
        """Codex's remote compaction: the conversation in, a shorter one out, billed like a Responses call."""
        doc = await self._read(req)
        model = str(doc.get("model", ""))
        prompt = self._responses_prompt(model, doc)
        completion = self._completion_tokens(req, None)
        usage = self._openai_usage(req, prompt, completion, "responses")
        body = {"id": f"resp_{uuid.uuid4().hex[:12]}", "object": "response.compaction",
                "created_at": int(time.time()), "output": [
                    {"type": "message", "role": "user", "content": [
                        {"type": "input_text", "text": "(compacted) " + " ".join(["tok"] * completion)}]}],
                "usage": usage}
        return await self._json(req, body, doc)

    async def responses(self, req: web.Request) -> web.StreamResponse:
        doc = await self._read(req)
        model = str(doc.get("model", ""))
        prompt = self._responses_prompt(model, doc)
        completion = self._completion_tokens(req, doc.get("max_output_tokens"))
        usage = self._openai_usage(req, prompt, completion, "responses")
        rid = f"resp_{uuid.uuid4().hex[:12]}"
        text = " ".join(["tok"] * completion)
        final = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "completed",
                 "model": model, "output": [{"type": "message", "id": f"msg_{rid}", "status": "completed",
                                             "role": "assistant", "content": [
                                                 {"type": "output_text", "text": text, "annotations": []}]}],
                 "usage": usage}
        if doc.get("stream"):
            return await self._stream(req, doc, self._responses_events(rid, final, completion))
        fault = await self._fault_json(req)
        if fault is not None:
            return fault
        return await self._json(req, final, doc)

    def _responses_events(self, rid: str, final: dict[str, Any], completion: int) -> list[bytes]:
        """The real stream's sequence: Codex shows nothing without the item and content-part events."""
        seq = iter(range(10**6))
        item = final["output"][0]
        text = item["content"][0]["text"]
        empty_item = {**item, "status": "in_progress", "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        at = {"item_id": item["id"], "output_index": 0}

        def ev(kind: str, **fields: Any) -> bytes:
            return self._sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

        evs = [ev("response.created", response={**final, "status": "in_progress", "output": [], "usage": None}),
               ev("response.in_progress", response={**final, "status": "in_progress", "output": [], "usage": None}),
               ev("response.output_item.added", output_index=0, item=empty_item),
               ev("response.content_part.added", **at, content_index=0, part=part)]
        for i in range(completion):
            evs.append(ev("response.output_text.delta", **at, content_index=0, delta=(" " if i else "") + "tok",
                          logprobs=[]))
        evs += [ev("response.output_text.done", **at, content_index=0, text=text, logprobs=[]),
                ev("response.content_part.done", **at, content_index=0, part={**part, "text": text}),
                ev("response.output_item.done", output_index=0, item=item),
                ev("response.completed", response=final)]
        return evs

    async def embeddings(self, req: web.Request) -> web.StreamResponse:
        doc = await self._read(req)
        model = str(doc.get("model", ""))
        inp = doc.get("input")
        texts = [inp] if isinstance(inp, str) else [x for x in (inp or []) if isinstance(x, str)]
        prompt = plain_tokens(model, texts)
        fault = await self._fault_json(req)
        if fault is not None:
            return fault
        data = [{"object": "embedding", "index": i, "embedding": [0.0, 0.1, 0.2]} for i in range(len(texts))]
        return await self._json(req, {"object": "list", "data": data, "model": model,
                                "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}, doc)

    # ---- Anthropic -------------------------------------------------------------------------------

    @staticmethod
    def _anthropic_input(doc: dict[str, Any]) -> int:
        texts = _texts(doc.get("system")) if doc.get("system") else []
        for m in doc.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            texts += _texts(content)
            for block in content if isinstance(content, list) else ():
                if isinstance(block, dict) and block.get("type") in ("tool_use", "tool_result"):
                    texts += _structured(block.get("input")) + _structured(block.get("content"))
        texts += _structured(doc.get("tools"))
        return plain_tokens("claude", texts) + 8

    async def count_tokens(self, req: web.Request) -> web.Response:
        doc = await self._read(req)
        return web.json_response({"input_tokens": self._anthropic_input(doc)}, headers=self._headers(doc))

    async def messages(self, req: web.Request) -> web.StreamResponse:
        doc = await self._read(req)
        model = str(doc.get("model", ""))
        total_in = self._anthropic_input(doc)
        read = min(total_in, _int_header(req, "x-fake-cached-tokens", 0))
        write = min(total_in - read, _int_header(req, "x-fake-cache-write-tokens", 0))
        base_in = total_in - read - write
        completion = self._completion_tokens(req, doc.get("max_tokens"))
        mid = f"msg_{uuid.uuid4().hex[:12]}"
        usage = {"input_tokens": base_in, "cache_creation_input_tokens": write,
                 "cache_read_input_tokens": read, "output_tokens": completion}
        if doc.get("stream"):
            start_usage = {**usage, "output_tokens": 1}
            evs = [self._sse({"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": start_usage}}, "message_start"),
                self._sse({"type": "content_block_start", "index": 0,
                           "content_block": {"type": "text", "text": ""}}, "content_block_start"),
                self._sse({"type": "ping"}, "ping")]
            for i in range(completion):
                evs.append(self._sse({"type": "content_block_delta", "index": 0, "delta": {
                    "type": "text_delta", "text": (" " if i else "") + "tok"}}, "content_block_delta"))
            evs += [self._sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                    self._sse({"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                  "stop_sequence": None},
                               "usage": dict(usage)}, "message_delta"),
                    self._sse({"type": "message_stop"}, "message_stop")]
            return await self._stream(req, doc, evs)
        if req.headers.get("x-fake-fault") == "500":
            return web.json_response({"type": "error", "error": {"type": "api_error", "message": "boom"}},
                                     status=500)
        fault = await self._fault_json(req)
        if fault is not None:
            return fault
        return await self._json(req, {"id": mid, "type": "message", "role": "assistant", "model": model,
                                "content": [{"type": "text", "text": " ".join(["tok"] * completion)}],
                                "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}, doc)


async def start_fake(name: str, host: str, port: int, compress: bool = False
                     ) -> tuple[web.AppRunner, int, FakeUpstream]:
    fake = FakeUpstream(name, compress)
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    for sock in getattr(site._server, "sockets", None) or []:
        bound = sock.getsockname()[1]
    return runner, bound, fake


async def _main(specs: list[str], host: str, compress: bool = False) -> None:
    runners = []
    for spec in specs:
        name, _, port = spec.partition("=")
        runner, bound, _ = await start_fake(name, host, int(port), compress)
        runners.append(runner)
        print(f"fake {name} listening on {host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for r in runners:
            await r.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description="fake LLM upstreams")
    ap.add_argument("specs", nargs="+", help="name=port, e.g. openai=18001 anthropic=18002 ollama=18003")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--compress", action="store_true",
                    help="compress answers as the client's accept-encoding allows (gzip first, as Anthropic does)")
    args = ap.parse_args()
    try:
        asyncio.run(_main(args.specs, args.host, args.compress))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
