"""The request path in plain Python: one `RequestState` per ext_proc stream, one method per phase.

Nothing here imports gRPC or Envoy's protobufs. The edge (`edge/extproc.py`) turns each ProcessingRequest
into a call here and each `Reply` back into a ProcessingResponse, so the whole path is testable without gRPC.
The phases live in inbound.py (request headers and body), outbound.py (response) and settle.py.
"""

from __future__ import annotations

from nexus_extproc.request.core import OutputStats
from nexus_extproc.request.inbound import Inbound
from nexus_extproc.request.outbound import Outbound
from nexus_extproc.request.state import MAX_STREAM_TEXT, Immediate, Reply, RequestState

__all__ = ["MAX_STREAM_TEXT", "Immediate", "OutputStats", "Processor", "Reply", "RequestState"]


class Processor(Inbound, Outbound):
    """One per process: request_headers, request_body, response_headers, response_body, then finish."""
