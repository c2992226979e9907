"""Drive a real grpc.aio ext_proc server the way Envoy does: builders for each ProcessingRequest."""

from __future__ import annotations

import json
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc


def headers_msg(headers: dict[str, str], *, response: bool = False, eos: bool = False) -> ep.ProcessingRequest:
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])
    hh = ep.HttpHeaders(headers=hm, end_of_stream=eos)
    return ep.ProcessingRequest(response_headers=hh) if response else ep.ProcessingRequest(request_headers=hh)


def body_msg(body: bytes | dict[str, Any], *, response: bool = False, eos: bool = True) -> ep.ProcessingRequest:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    hb = ep.HttpBody(body=raw, end_of_stream=eos)
    return ep.ProcessingRequest(response_body=hb) if response else ep.ProcessingRequest(request_body=hb)


def req_headers(path: str = "/v1/chat/completions", extra: dict[str, str] | None = None) -> ep.ProcessingRequest:
    h = {":method": "POST", ":path": path, ":authority": "llm", "content-type": "application/json",
         "authorization": "Bearer sk-test"}
    h.update(extra or {})
    return headers_msg(h)


def set_headers(mutation: Any) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


class Stream:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = ep_grpc.ExternalProcessorStub(channel).Process()

    async def send(self, msg: ep.ProcessingRequest) -> ep.ProcessingResponse:
        await self.call.write(msg)
        resp = await self.call.read()
        assert resp is not grpc.aio.EOF
        return resp

    async def close(self) -> None:
        await self.call.done_writing()

    def cancel(self) -> None:
        self.call.cancel()
