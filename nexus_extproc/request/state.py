"""The per-request state and the reply values the edge renders (one RequestState per ext_proc stream)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from nexus_extproc.apis import ParsedRequest, Translator
from nexus_extproc.apis.content_encoding import Decoder
from nexus_extproc.apis.sse import SSEParser
from nexus_extproc.apis.usage import UsageReport
from nexus_extproc.budget.service import Admission
from nexus_extproc.metering.pricing import ResolvedPrice
from nexus_extproc.request.router import Route

# Text kept per stream to count output tokens when a stream ends without usage; past this, chars/4.
MAX_STREAM_TEXT = 1 << 20


@dataclass(slots=True)
class Immediate:
    status: int
    body: bytes
    headers: list[tuple[str, str]]
    details: str


@dataclass(slots=True)
class Reply:
    """What one phase answers, in plain terms; the adapter renders it for its phase."""

    set_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: list[str] = field(default_factory=list)
    body: bytes | None = None
    clear_route_cache: bool = False
    immediate: Immediate | None = None
    stream_response_body: bool = False
    passthrough: bool = False  # forwarded uncharged: Envoy sends nothing more of this request or its response
    envoy_reads_body: bool = False  # the response body goes past the server: Envoy reports its usage
    metadata: dict[str, Any] | None = None


@dataclass(slots=True)
class RequestState:
    """Everything one request carries from its first message to its settlement."""

    req_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.monotonic)
    path: str = ""
    family: str = "openai"
    translator: Translator | None = None
    client_nexus_headers: list[str] = field(default_factory=list)
    identity: dict[str, str] = field(default_factory=dict)  # trusted x-nexus-user/-team/-agent only
    task: str = ""  # trusted x-nexus-task, validated (request/attribution.py)
    tags: str = ""  # trusted x-nexus-tags, normalised
    tool: str = "other"  # the client tool's label (request/client_tool.py)
    session: str = ""  # the client's own session id, hashed ("" when it sends none)
    api_key_hash: str | None = None
    parsed: ParsedRequest | None = None
    route: Route | None = None
    model: str | None = None
    price: ResolvedPrice | None = None
    asked_price: ResolvedPrice | None = None  # the cloud model's price when the request was rerouted
    priced_model: str | None = None  # the model settled at: the one that answered, when the database knows it
    tier: str = "heuristic"
    counted: bool = False  # the prompt was counted: `tier` means something
    estimated: bool = False  # `estimate` was computed (a refusal may come before or after)
    prompt_tokens: int = 0  # our count, as counted (calibration learns against this)
    prompt_estimate: int = 0  # what is reserved for: the count after calibration
    tool_calls: int = 0  # server-side tool calls (web search, ...) reserved for
    expected_output: int = 0
    estimate: int = 0
    admission: Admission | None = None
    added_stream_usage: bool = False  # the server asked for the usage chunk and removes it (stream_usage: hidden)
    server_hides_usage: bool = False  # ... reading the stream itself; else Envoy's Lua filter does (envoy/lua/)
    response_status: int = 0
    response_started: bool = False  # response headers, or the first body message where headers are skipped
    streaming: bool = False
    accept_encoding: str | None = None  # the client's, narrowed to what we read before it goes upstream
    decoder: Decoder | None = None  # a content-encoded response: the copy we read is decoded by this
    undecoded: bool = False  # encoded in a way we cannot read (or past the read limit): settled from our counts
    sse: SSEParser | None = None
    usage: UsageReport = field(default_factory=UsageReport)
    usage_final: bool = False  # the provider's final usage was seen (JSON usage, or the stream's last event)
    out_text: list[str] = field(default_factory=list)
    out_chars: int = 0
    response_complete: bool = False
    final_cost: int | None = None
    settle_source: str | None = None
    finished: bool = False
    envoy_declared: bool = False  # its Envoy says it reads responses itself (ext_proc stream's initial metadata)
    envoy_hides_usage: bool = False  # ... and hides the usage chunk the server asks for (the same metadata)
    envoy_settles: bool = False  # Envoy reads this response's usage (server.settlement, or that declaration)
    awaits_report: bool = False  # parked until Envoy's access-log report (server.settlement: envoy)
    envoy_reads: bool = False  # its response headers came here, its body goes past: Envoy reports the usage
    report_missing: bool = False  # settled at its estimate because no report came in time
    forwarded: bool = False  # the request-body reply went out without an immediate answer
