"""The access-log receiver at a server's stop, on a real grpc.aio server with a real client stream: whether its
handler returns on close() or is cancelled by the server's stop, the read it leaves behind is collected, so
asyncio never logs "Task exception was never retrieved" (CI31 saw it at a demo's Ctrl-C)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import grpc
import pytest
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from nexus_dev.stack import free_port
from nexus_extproc.edge.access_log import AccessLogReceiver
from nexus_extproc.edge.peer import PeerCheck


@pytest.mark.parametrize("close_first", [True, False], ids=["close-then-stop", "stop-cancels-the-handler"])
async def test_an_abandoned_read_is_never_left_unretrieved(close_first: bool):
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
    port = free_port()
    server = grpc.aio.server()
    receiver = AccessLogReceiver(None, PeerCheck(None))  # type: ignore[arg-type]  # no entry reaches it
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(receiver, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    quiet: asyncio.Queue[als_pb2.StreamAccessLogsMessage | None] = asyncio.Queue()

    async def messages():  # an Envoy whose stream is open and idle
        while (m := await quiet.get()) is not None:
            yield m

    call = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(messages())
    for _ in range(100):
        if receiver._open:
            break
        await asyncio.sleep(0.02)
    assert receiver._open == 1
    if close_first:
        receiver.close()
    await server.stop(0)
    await quiet.put(None)
    try:
        await call
    except grpc.aio.AioRpcError:
        pass  # the stop ended it
    await channel.close()
    for _ in range(5):
        await asyncio.sleep(0.05)
        gc.collect()
    assert receiver._open == 0
    assert not [c for c in unretrieved if "never retrieved" in str(c.get("message", ""))], unretrieved
