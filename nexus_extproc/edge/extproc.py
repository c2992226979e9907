"""The gRPC edge: the only module that speaks Envoy's ext_proc protobufs.

It turns each ProcessingRequest into a call on `Processor` and each `Reply` into the ProcessingResponse
for that phase. Envoy usually ends a stream by resetting it, so settlement never waits for a clean close:
it is scheduled from `finally`, outside the RPC's task, and runs exactly once per stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from nexus_extproc.edge.peer import PeerCheck, envoy_declarations
from nexus_extproc.ops import metrics
from nexus_extproc.request.headers import METADATA_NAMESPACE, RESPONSE_METADATA_NAMESPACE
from nexus_extproc.request.pipeline import Processor, Reply, RequestState

log = logging.getLogger("nexus_extproc.edge.extproc")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_PM = processing_mode_pb2.ProcessingMode
# mode_override replaces the whole ProcessingMode, so every field is restated, not only the body mode.
STREAMED_RESPONSE_MODE = _PM(
    request_header_mode=_PM.SEND, response_header_mode=_PM.SEND, request_body_mode=_PM.BUFFERED,
    response_body_mode=_PM.STREAMED, request_trailer_mode=_PM.SKIP, response_trailer_mode=_PM.SKIP)

# The response body goes past the server (server.settlement: envoy, response headers sent): Envoy reports usage.
ENVOY_READS_MODE = _PM(
    request_header_mode=_PM.SEND, response_header_mode=_PM.SEND, request_body_mode=_PM.BUFFERED,
    response_body_mode=_PM.NONE, request_trailer_mode=_PM.SKIP, response_trailer_mode=_PM.SKIP)

# A pass-through (a free endpoint): nothing more of the request or its response comes to the server.
PASSTHROUGH_MODE = _PM(
    request_header_mode=_PM.SEND, response_header_mode=_PM.SKIP, request_body_mode=_PM.NONE,
    response_body_mode=_PM.NONE, request_trailer_mode=_PM.SKIP, response_trailer_mode=_PM.SKIP)

_EMPTY = {
    "request_headers": ep.ProcessingResponse(request_headers=ep.HeadersResponse()),
    "request_body": ep.ProcessingResponse(request_body=ep.BodyResponse()),
    "response_headers": ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
    "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
    "request_trailers": ep.ProcessingResponse(request_trailers=ep.TrailersResponse()),
    "response_trailers": ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
}


def header_map(hm: Any) -> dict[str, str]:
    return {h.key: h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value for h in hm.headers}


def response_facts(req: ep.ProcessingRequest) -> tuple[int, str]:
    """What the skipped response headers would have said (envoy/nexus.yaml): the status from the `response.code`
    attribute, the content-encoding from the metadata Envoy's header_to_metadata filter forwards."""
    attrs = req.attributes.get("envoy.filters.http.ext_proc")
    code = attrs.fields.get("response.code") if attrs is not None else None
    meta = req.metadata_context.filter_metadata.get(RESPONSE_METADATA_NAMESPACE)
    enc = meta.fields.get("content_encoding") if meta is not None else None
    return (int(code.number_value) if code is not None else 0,
            enc.string_value if enc is not None else "")


def _hvo(key: str, value: str) -> base_pb2.HeaderValueOption:
    # raw_value, not value: Envoy 1.40 sets headers empty when only `value` is given.
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
                                      append_action=_OVERWRITE)


def _struct(meta: dict[str, Any]) -> struct_pb2.Struct:
    """Flat string/number/bool values only (all our metadata is): set field by field, which takes 6 µs for
    the request phase's 15 keys where Struct.update's generic walk takes 15."""
    s = struct_pb2.Struct()
    fields = s.fields[METADATA_NAMESPACE].struct_value.fields
    for k, v in meta.items():
        if isinstance(v, str):
            fields[k].string_value = v
        elif isinstance(v, bool):
            fields[k].bool_value = v
        elif isinstance(v, int | float):
            fields[k].number_value = v
        elif v is None:
            fields[k].null_value = struct_pb2.NULL_VALUE
        else:
            fields[k].string_value = str(v)
    return s


def render(phase: str, reply: Reply) -> ep.ProcessingResponse:
    if reply.immediate is not None:
        im = reply.immediate
        return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=im.status),
            headers=ep.HeaderMutation(set_headers=[_hvo(k, v) for k, v in im.headers]),
            body=im.body, details=im.details))
    if not (reply.set_headers or reply.remove_headers or reply.body is not None or reply.clear_route_cache
            or reply.metadata or reply.stream_response_body or reply.passthrough or reply.envoy_reads_body):
        return _EMPTY[phase]
    common = ep.CommonResponse(clear_route_cache=reply.clear_route_cache)
    if reply.set_headers or reply.remove_headers:
        common.header_mutation.CopyFrom(ep.HeaderMutation(
            set_headers=[_hvo(k, v) for k, v in reply.set_headers], remove_headers=reply.remove_headers))
    if reply.body is not None:
        common.body_mutation.body = reply.body
    if phase in ("request_headers", "response_headers"):
        resp = ep.ProcessingResponse(**{phase: ep.HeadersResponse(response=common)})
    else:
        resp = ep.ProcessingResponse(**{phase: ep.BodyResponse(response=common)})
    if reply.stream_response_body:
        resp.mode_override.CopyFrom(STREAMED_RESPONSE_MODE)
    elif reply.passthrough:
        resp.mode_override.CopyFrom(PASSTHROUGH_MODE)
    elif reply.envoy_reads_body:
        resp.mode_override.CopyFrom(ENVOY_READS_MODE)
    if reply.metadata:
        resp.dynamic_metadata.CopyFrom(_struct(reply.metadata))
    return resp


async def _ended(context: grpc.aio.ServicerContext) -> None:
    done = asyncio.get_running_loop().create_future()

    def _set(_: object) -> None:
        if not done.done():
            done.set_result(None)

    context.add_done_callback(_set)
    await done


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    def __init__(self, processor: Processor, idle_timeout: float, peer: PeerCheck | None = None) -> None:
        self.processor = processor
        self.peer = peer or PeerCheck(None)
        self.idle_timeout = idle_timeout
        self.settling: set[asyncio.Task[None]] = set()
        self.active = 0
        self.started = 0  # streams since start (worker recycling)
        self.access_log: Any = None  # the AccessLogReceiver beside it (app.start_grpc): closed after the drain

    async def Process(self, request_iterator: AsyncIterator[ep.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ep.ProcessingResponse]:
        if not await self.peer.allow(context, "ext_proc"):
            return
        proc = self.processor
        state = RequestState()
        state.envoy_declared, state.envoy_hides_usage = envoy_declarations(context)
        phase = "open"
        self.active += 1
        self.started += 1
        metrics.streams_active.inc()
        loop = asyncio.get_running_loop()
        moved = loop.time()
        try:
            async with asyncio.timeout(self.idle_timeout) as deadline:
                async for req in request_iterator:
                    # Push the idle deadline at most once a second (a stream may be closed up to 1 s early):
                    # rescheduling on every message cost 3.4 µs each, 52 times for a streamed response.
                    now = loop.time()
                    if now - moved >= 1.0:
                        deadline.reschedule(now + self.idle_timeout)
                        moved = now
                    phase = req.WhichOneof("request") or "unknown"
                    try:
                        if phase == "request_headers":
                            h = req.request_headers
                            reply = proc.request_headers(state, header_map(h.headers), h.end_of_stream)
                        elif phase == "request_body":
                            reply = await proc.request_body(state, req.request_body.body)
                        elif phase == "response_headers":
                            reply = proc.response_headers(state, header_map(req.response_headers.headers))
                        elif phase == "response_body":
                            b = req.response_body
                            if not state.response_started:
                                proc.response_start(state, *response_facts(req))
                            reply = proc.response_body(state, b.body, b.end_of_stream)
                        elif phase in _EMPTY:
                            yield _EMPTY[phase]
                            continue
                        else:
                            continue
                    except Exception:
                        # A bug, not the client's input (that is a 400 in the processor): the request side
                        # answers in the client's error shape rather than resetting the stream (Envoy's bare
                        # 500); the response side lets the provider's bytes through and settles from our counts.
                        metrics.stream_errors.labels(phase).inc()
                        log.exception("ext_proc phase failed", extra={"phase": phase})
                        reply = proc.internal_error(state) if phase.startswith("request") else Reply()
                    if phase == "request_body" and reply.immediate is None:
                        await proc.forwarded(state)  # recorded before Envoy can send it upstream
                    yield render(phase, reply)
                    if reply.immediate is not None:
                        return
                    if phase == "request_body" and state.envoy_hides_usage and not state.server_hides_usage:
                        # This Envoy's routes send no response message (envoy/nexus.yaml): wait for the stream's
                        # end with no read in flight. grpc.aio leaks a read batch that a reset cancels
                        # (grpc/grpc#43360): bench/memory.py --settlement envoy, +125 B per request with the read,
                        # +16 B without. Envoy 1.40 resets the stream at the HTTP stream's end, which cancels this
                        # wait; an Envoy that only half-closed would leave it to stream_idle_timeout_secs.
                        await _ended(context)
                        return
                    # Envoy sends nothing after the response's last bytes but resets the stream; ending the
                    # call ourselves first means no read is in flight when the reset comes. grpc.aio leaks a
                    # batch's op array when its awaiter is cancelled (grpc/grpc#43360), ~130 B per request.
                    if (phase == "response_body" and req.response_body.end_of_stream) or (
                            phase == "response_headers" and req.response_headers.end_of_stream):
                        return
        except TimeoutError:
            metrics.stream_errors.labels("idle_timeout").inc()
            log.warning("ext_proc stream idle past its deadline; closing", extra={"phase": phase})
        except asyncio.CancelledError:
            raise  # Envoy reset the stream: the normal end of most streams
        except Exception:
            metrics.stream_errors.labels(phase).inc()
            log.exception("ext_proc stream failed", extra={"phase": phase})
            raise
        finally:
            self.active -= 1
            metrics.streams_active.dec()
            task = asyncio.get_running_loop().create_task(proc.finish(state))
            self.settling.add(task)
            task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self.settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            metrics.stream_errors.labels("settle").inc()
            log.error("settlement failed", exc_info=task.exception())

    async def drain(self, grace: float) -> None:
        """Wait for in-flight streams and their settlements (SIGTERM); streams still waiting for Envoy's report
        settle at their estimate."""
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while (self.active or self.settling) and loop.time() < end:
            if self.settling:
                await asyncio.wait(list(self.settling), timeout=max(0.0, end - loop.time()))
            else:
                await asyncio.sleep(0.05)
        await self.processor.settle_awaiting()
        if self.access_log is not None:
            self.access_log.close()
