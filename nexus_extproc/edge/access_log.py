"""The gRPC access-log edge: Envoy's AccessLogService stream, read into plain reports for request/reports.py.

Envoy batches entries on one long-lived stream per worker thread and never waits for an answer (delivery is at
most once), so each entry is handed on as it is read; the stream's single response goes out when Envoy closes it.
Only entries of requests this filter admitted (with `nexus.extproc.request_id`) carry a report.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import json_format, struct_pb2

from nexus_extproc.edge.peer import PeerCheck
from nexus_extproc.request.headers import METADATA_NAMESPACE, USAGE_METADATA_NAMESPACE
from nexus_extproc.request.pipeline import Processor
from nexus_extproc.request.reports import EnvoyReport
from nexus_extproc.request.snapshot import SNAPSHOT_KEY

log = logging.getLogger(__name__)


def _value(v: struct_pb2.Value | None) -> Any:
    """sse_to_metadata hands a JSON object over as its JSON text; a Struct is taken as it is."""
    if v is None:
        return None
    # The usual kinds read directly: MessageToDict's generic walk took most of a report's parse.
    kind = v.WhichOneof("kind")
    out: Any = v.string_value if kind == "string_value" else (
        v.number_value if kind == "number_value" else json_format.MessageToDict(v))
    if isinstance(out, str) and out[:1] in ("{", "["):
        try:
            return json.loads(out)
        except ValueError:
            return None
    return out


def _json_usage(fields: Any) -> dict[str, Any] | None:
    """A JSON answer's usage, copied by json_to_metadata one leaf per key (`usage.prompt_tokens_details.
    cached_tokens`), nested back into the block the provider sent. Numbers come as doubles; counts are ints."""
    out: dict[str, Any] = {}
    for key, v in fields.items():
        if not key.startswith("usage."):
            continue
        num = v.number_value if v.HasField("number_value") else None
        if num is None or num != num or num < 0 or num > 1e15:
            continue
        *parents, leaf = key.split(".")[1:]
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = int(num) if num.is_integer() else num
    return out or None


def report_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> EnvoyReport | None:
    md = entry.common_properties.metadata.filter_metadata
    ours = md.get(METADATA_NAMESPACE)
    rid = ours.fields.get("request_id") if ours is not None else None
    if rid is None or not rid.string_value:
        return None
    usage = md.get(USAGE_METADATA_NAMESPACE)
    fields = usage.fields if usage is not None else {}
    usage = _value(fields.get("usage"))  # a stream's: sse_to_metadata's copy of the whole object
    return EnvoyReport(req_id=rid.string_value, status=entry.response.response_code.value,
                       model=_value(fields.get("model")),
                       usage=usage if usage is not None else _json_usage(fields),
                       start_usage=_value(fields.get("start_usage")),
                       snapshot=ours.fields[SNAPSHOT_KEY].string_value if SNAPSHOT_KEY in ours.fields else None,
                       instance=ours.fields["instance"].string_value if "instance" in ours.fields else "")


def _collect(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _abandon(read: asyncio.Future[Any]) -> None:
    """A read nobody will consume: it may still end later (grpc.aio does not always honour the cancel), or have
    ended just now; its outcome, StopAsyncIteration included, is collected so asyncio never logs it as never
    retrieved."""
    read.add_done_callback(_collect)
    read.cancel()


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, processor: Processor, peer: PeerCheck) -> None:
        self.processor = processor
        self.peer = peer
        self._open = 0  # access-log streams being served (logged at close)
        self._closed = False
        self._closing = asyncio.Event()

    def close(self) -> None:
        """Shutdown, once the ext_proc streams have drained: Envoy's access-log streams never end by themselves,
        and the gRPC server's stop would wait its whole grace period for them. Ended here, Envoy opens the next
        one on a process still serving."""
        self._closed = True
        log.info("closing access-log streams", extra={"streams": self._open})
        self._closing.set()

    async def StreamAccessLogs(self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
                               context: grpc.aio.ServicerContext) -> als_pb2.StreamAccessLogsResponse:
        if self._closed or not await self.peer.allow(context, "access_log"):
            return als_pb2.StreamAccessLogsResponse()
        it = request_iterator.__aiter__()
        self._open += 1
        try:
            while not self._closed:
                # Each wait also watches for close(): cancelling the handler's task does not end the RPC in
                # grpc.aio (measured: the server's stop still waited its whole grace period); returning does.
                nxt = asyncio.ensure_future(it.__anext__())
                closing = asyncio.ensure_future(self._closing.wait())
                try:
                    await asyncio.wait({nxt, closing}, return_when=asyncio.FIRST_COMPLETED)
                except BaseException:
                    _abandon(nxt)  # the server's stop cancelled this handler, maybe as the read ended (CI31)
                    raise
                finally:
                    closing.cancel()
                if not nxt.done():
                    _abandon(nxt)
                    break
                try:
                    msg = nxt.result()
                except StopAsyncIteration:
                    break
                reports = [r for r in map(report_of, msg.http_logs.log_entry) if r is not None]
                # A batch's settlements run together, so the ledger writes them in one transaction (SQLite group
                # commit, one Redis pipeline) instead of one round trip each.
                await asyncio.gather(*(self._settle(r) for r in reports))
        finally:
            self._open -= 1
        return als_pb2.StreamAccessLogsResponse()

    async def _settle(self, report: EnvoyReport) -> None:
        try:
            await self.processor.envoy_report(report)
        except Exception:
            log.exception("settling from an access-log report failed")
