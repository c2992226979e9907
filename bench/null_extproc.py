"""A null ext_proc server: the same grpc.aio stack as nexus-extproc, answering every message with an empty
response of its phase. bench/overhead.py measures it as the floor: what any Python grpc.aio processor pays per
message before doing anything, so our own CPU per request can be reported above it.

    python bench/null_extproc.py PORT
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

EMPTY = {
    "request_headers": ep.ProcessingResponse(request_headers=ep.HeadersResponse()),
    "request_body": ep.ProcessingResponse(request_body=ep.BodyResponse()),
    "response_headers": ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
    "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
}


class Null(ep_grpc.ExternalProcessorServicer):
    async def Process(self, request_iterator: AsyncIterator[ep.ProcessingRequest],  # type: ignore[override]
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ep.ProcessingResponse]:
        async for req in request_iterator:
            phase = req.WhichOneof("request")
            if phase in EMPTY:
                yield EMPTY[phase]
            if phase == "response_body" and req.response_body.end_of_stream:
                return


async def main(port: int) -> None:
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(Null(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
