"""The Envoy config, generated from one source: `envoy/nexus.yaml` (production shape) and the demo's and
tests' configs differ only in addresses, so what the tests run is what ships.

Run `python -m nexus_dev.envoy_config > envoy/nexus.yaml` to regenerate; a test checks it is fresh.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nexus_extproc.apis import TRANSLATORS
from nexus_extproc.apis.errors import NexusError, error_doc
from nexus_extproc.metering.pricing import UsageExtraction
from nexus_extproc.request.headers import (
    METADATA_NAMESPACE,
    RESPONSE_METADATA_NAMESPACE,
    USAGE_METADATA_NAMESPACE,
)

# The largest request body Envoy buffers for the server (json_to_metadata and ext_proc hold the whole body): the
# Anthropic Messages API's own limit, so a long-context request with images that the provider accepts (9.5 MB was
# refused at the 8 MiB this used to be) is not refused here. Set per route (the virtual host's
# request_body_buffer_limit), so the listener's flow-control window stays at CONNECTION_BUFFER. Keep it in step
# with the server's max_request_body_bytes.
REQUEST_BODY_LIMIT = 32 * 1024 * 1024
CONNECTION_BUFFER = 8 * 1024 * 1024  # per-connection read/write buffering (flow control) toward clients and upstreams
ACCESS_LOG_FORMAT = (
    "[%START_TIME%] \"%REQ(:METHOD)% %REQ(:PATH)%\" %RESPONSE_CODE% %RESPONSE_FLAGS% "
    "upstream=%UPSTREAM_CLUSTER% dur_ms=%DURATION% "
    "model=%DYNAMIC_METADATA(nexus.extproc:model)% decision=%DYNAMIC_METADATA(nexus.extproc:decision)% "
    "cost_est=%DYNAMIC_METADATA(nexus.extproc:cost_estimated_usd)% cost=%DYNAMIC_METADATA(nexus.extproc:cost_usd)% "
    "tokens_in=%DYNAMIC_METADATA(nexus.extproc:tokens_in)% tokens_out=%DYNAMIC_METADATA(nexus.extproc:tokens_out)% "
    "settlement=%DYNAMIC_METADATA(nexus.extproc:settlement)% request_id=%DYNAMIC_METADATA(nexus.extproc:request_id)% "
    # What Envoy's own filters read of the answer (settlement: envoy): the server's cost is in the ledger.
    "usage=%DYNAMIC_METADATA(nexus.usage)%\n"
)


@dataclass
class Upstream:
    name: str
    host: str
    port: int
    tls: bool = False
    local: bool = False


@dataclass
class EnvoyParams:
    listen_address: str = "0.0.0.0"
    listen_port: int = 10000
    admin_port: int = 9901
    extproc_host: str = "127.0.0.1"
    extproc_ports: list[int] = field(default_factory=lambda: [50051])
    # Unix sockets of the server (server.uds_path): used instead of the TCP ports when given.
    extproc_uds: list[str] = field(default_factory=list)
    upstreams: list[Upstream] = field(default_factory=lambda: [
        Upstream("openai", "api.openai.com", 443, tls=True),
        Upstream("anthropic", "api.anthropic.com", 443, tls=True),
        Upstream("ollama", "127.0.0.1", 11434, local=True),
        Upstream("vllm", "127.0.0.1", 8000, local=True),
    ])
    message_timeout: str = "5s"
    failure_mode_allow: bool = False
    access_log_path: str = "/dev/stdout"
    local_health_interval: str = "5s"
    # Three ext_proc exchanges per JSON request instead of four: no response-headers message (the X-Nexus-*
    # headers come from the request phase's metadata through the route), and the response body BUFFERED for
    # JSON or STREAMED for a stream request, chosen by route from the request body's `stream` field.
    # False: the four-exchange design the mesh integrations use (bench/overhead.py compares both).
    skip_response_headers: bool = True
    # Who reads a stream's usage (server.settlement, docs/streaming.md): "ext_proc", the server chunk by chunk; or
    # "envoy": sse_to_metadata, reported on the gRPC access-log stream, so no chunk goes to the server (a stream whose
    # added usage chunk the server hides, hide_usage_in="server", keeps the ext_proc path). Needs skip_response_headers.
    settlement: str = "envoy"
    # server.stream_usage: "visible" sends OpenAI streams whose usage chunk the server adds through Envoy's path too.
    stream_usage: str = "hidden"
    # Who hides that chunk (settlement="envoy"): "envoy", a Lua filter on those streams' route (envoy/lua/), so they
    # take the fast path too; "server", ext_proc's STREAMED path (bench/overhead.py --modes-only compares both).
    hide_usage_in: str = "envoy"
    # The shared secret the server checks on every ext_proc and access-log stream (server.envoy_token_*).
    envoy_token: str | None = None
    # One access logger per server worker, each taking its worker's requests (the fast path); False: one logger to
    # the whole cluster, as a mesh does (any process settles a report from the request's snapshot).
    reports_per_worker: bool = True
    # Request bodies past this get Envoy's 413 (in the client's error shape) before the server sees them.
    request_body_limit: int = REQUEST_BODY_LIMIT
    # How long a provider may take to answer (the route timeout; a long completion streams for minutes).
    upstream_timeout: str = "600s"
    # Envoy's gzip compressor toward clients that accept it, first in the chain (so last on the response, after
    # everything that reads the provider's decoded answer): what an Envoy that already compresses looks like.
    compress_to_client: bool = False


# The X-Nexus-* headers the server publishes as request-phase metadata (request/core.py _nexus_headers).
NEXUS_RESPONSE_HEADERS = ("x-nexus-cost-estimated", "x-nexus-backend-type", "x-nexus-token-tier",
                          "x-nexus-request-id", "x-nexus-budget-name", "x-nexus-budget-status",
                          "x-nexus-budget-utilization", "x-nexus-budget-remaining", "x-nexus-route-reason")
_EXT_PROC = "envoy.filters.http.ext_proc"

def _mode(response_header: str, response_body: str) -> dict[str, str]:
    return {"request_header_mode": "SEND", "request_body_mode": "BUFFERED", "response_header_mode": response_header,
            "response_body_mode": response_body, "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}


def _h2_options() -> dict[str, Any]:
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}


def _endpoints(name: str, host: str, ports: list[int]) -> dict[str, Any]:
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": p}}}} for p in ports]}]}


def _pipes(name: str, paths: list[str]) -> dict[str, Any]:
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"pipe": {"path": path}}}} for path in paths]}]}


_THRESHOLDS = {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                               "max_requests": 100000, "max_retries": 3}]}


def _upstream_cluster(u: Upstream, health_interval: str) -> dict[str, Any]:
    is_ip = u.host.replace(".", "").isdigit()
    c: dict[str, Any] = {
        "name": u.name,
        "type": "STATIC" if is_ip else "LOGICAL_DNS",
        "connect_timeout": "5s",
        "per_connection_buffer_limit_bytes": CONNECTION_BUFFER,
        "circuit_breakers": _THRESHOLDS,
        "load_assignment": _endpoints(u.name, u.host, [u.port]),
    }
    if not is_ip:
        c["dns_lookup_family"] = "V4_PREFERRED"
    if u.tls:
        c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": u.host}}
    if u.local:
        # Envoy's own view of the local model's health; the ext_proc server reads it before rerouting.
        c["health_checks"] = [{"timeout": "1s", "interval": health_interval, "unhealthy_threshold": 2,
                               "healthy_threshold": 1, "http_health_check": {"path": "/v1/models"}}]
        c["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    return c


# The server's immediate responses name their details `nexus_<code>` (edge/extproc.py render): Envoy's local-reply
# mappers below must leave them alone.
def _cel(expression: str) -> dict[str, Any]:
    return {"name": "envoy.access_loggers.extension_filters.cel", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
        "expression": expression}}


_NOT_OURS = _cel("!response.code_details.startsWith('nexus_')")
# Envoy's own answers in the client's API error shape, as the server's refusals are: Anthropic's under
# /v1/messages, OpenAI's elsewhere under /v1/. Other paths (a gateway shared with other traffic) keep Envoy's own.
# (status, Anthropic type, OpenAI type/code, message); a 500 is Envoy's when the server cannot be reached
# (failure_mode_allow: false): an empty text/plain body the SDKs could not read.
_LOCAL_ERRORS = ((413, "request_too_large", "request_too_large", "the request body exceeds the proxy's buffer limit"),
                 (500, "api_error", "budget_filter_unavailable",
                  "the budget filter could not be reached; the request was not sent to the provider"),
                 (503, "overloaded_error", "upstream_unavailable", "the upstream is unavailable"),
                 (504, "timeout_error", "upstream_timeout", "the upstream did not answer in time"))


def _api_path(anthropic: bool) -> dict[str, Any]:
    messages = {"name": ":path", "string_match": {"prefix": "/v1/messages"}}
    if anthropic:
        return {"header_filter": {"header": messages}}
    return {"and_filter": {"filters": [
        {"header_filter": {"header": {"name": ":path", "string_match": {"prefix": "/v1/"}}}},
        {"header_filter": {"header": {**messages, "invert_match": True}}}]}}


def _status(status: int) -> dict[str, Any]:
    return {"status_code_filter": {"comparison": {"op": "EQ", "value": {
        "default_value": status, "runtime_key": f"nexus.local_reply.{status}"}}}}


def local_reply_config() -> dict[str, Any]:
    mappers = []
    # A WebSocket upgrade where the listener allows none: Envoy answers 403 before any filter runs, and Codex
    # retries a 403 seven times (~6 s) before it falls back to HTTP; a 426 makes it fall back at once.
    mappers.append({"filter": {"extension_filter": _cel("response.code_details == 'upgrade_failed'")},
        "status_code": 426, "body_format_override": {"json_format": {"error": {
            "message": "the WebSocket transport is not served through the budget filter; use HTTP",
            "type": "websocket_not_supported", "code": "websocket_not_supported", "param": None}},
            "content_type": "application/json"}})
    for status, anthropic_type, openai_type, message in _LOCAL_ERRORS:
        for anthropic in (True, False):
            mappers.append({"filter": {"and_filter": {"filters": [
                _status(status), {"extension_filter": _NOT_OURS}, _api_path(anthropic)]}},
                "body_format_override": {"json_format": error_doc(
                    "anthropic" if anthropic else "openai",
                    NexusError(status, anthropic_type if anthropic else openai_type, message)),
                    "content_type": "application/json"}})
    return {"mappers": mappers}


_SSE = "envoy.filters.http.sse_to_metadata"
_LUA = "envoy.filters.http.lua"
HIDE_USAGE_LUA = Path(__file__).resolve().parent.parent / "envoy" / "lua" / "hide_usage.lua"


def _usage_rule(selectors: list[str], key: str, first_only: bool = False) -> dict[str, Any]:
    return {"rule": {"selectors": [{"key": k} for k in selectors], "on_present": {
        "metadata_namespace": USAGE_METADATA_NAMESPACE, "key": key, "type": "PROTOBUF_VALUE"}},
        "stop_processing_after_matches": 1 if first_only else 0}


def json_usage_paths() -> list[tuple[str, ...]]:
    """The usage fields of a JSON answer that settlement reads: every path the price database's extractors for
    our APIs read, plus `total_tokens` (an embeddings answer's only other field, which says its output is 0)."""
    pairs = sorted({(t.family, t.usage_flavor) for t in TRANSLATORS.values()})
    return [*UsageExtraction().leaf_paths(pairs), ("total_tokens",)]


def _json_usage_rules() -> list[dict[str, Any]]:
    """json_to_metadata copies leaf values only (an object selector writes nothing, measured): one rule per
    usage field, keyed by its dotted path under `usage.`, and the answered model."""
    def rule(path: tuple[str, ...], key: str, kind: str) -> dict[str, Any]:
        return {"selectors": [{"key": k} for k in path],
                "on_present": {"metadata_namespace": USAGE_METADATA_NAMESPACE, "key": key, "type": kind}}
    return [rule(("model",), "model", "STRING"),
            *(rule(("usage", *path), "usage." + ".".join(path), "NUMBER") for path in json_usage_paths())]


def _envoy_settles(routes: list[dict[str, Any]], filters: list[dict[str, Any]], hide_usage_in: str = "envoy"
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """settlement="envoy": responses leave ext_proc's response path. sse_to_metadata keeps a stream's answered
    model and usage (OpenAI's last `usage`, Anthropic's `message.usage` then `message_delta` usage, Responses'
    `response.usage`) in `nexus.usage`, json_to_metadata does the same for a JSON answer, field by field, and the
    gRPC access log brings it to the server. No buffering reader ever holds a body a decompressor decoded (it would
    never complete): json_to_metadata's response rules read before the decompressors, and the decompressors skip
    what ext_proc reads (json_response_filter, decompressor_filters)."""
    stream_route, *rest = routes
    off = {_EXT_PROC: {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                       "overrides": {"processing_mode": {**_mode("SKIP", "NONE")}}}}
    # Everything but a stream: JSON answers, free endpoints (passed through anyway), bodies the server refuses.
    rest = [{**r, "typed_per_filter_config": off} for r in rest]
    # The usage chunk the server adds for an OpenAI stream that did not ask for it is hidden by the Lua filter on
    # this route, or (hide_usage_in="server") by the server on ext_proc's STREAMED path (an identity response: the
    # server asks for one either way).
    hidden = {**stream_route, "match": {"safe_regex": {"regex": "^/v1/(chat/)?completions$"}, "dynamic_metadata": [
        *stream_route["match"]["dynamic_metadata"],
        {"filter": "nexus.request", "path": [{"key": "usage_requested"}], "value": {"bool_match": False}}]}}
    fast = {**stream_route, "typed_per_filter_config": off}
    if hide_usage_in == "envoy":
        hidden["typed_per_filter_config"] = {**off, _LUA: {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute", "name": "hide_usage"}}
    # sse_to_metadata and the decompressors run on every route: Envoy builds a stream's filter chain from the route
    # matched before ext_proc's decision (and before json_to_metadata read `stream`), so a per-route switch would
    # see the default route. Where the server reads the response itself the decompressors skip it (their matcher,
    # decompressor_filters), so they never hand ext_proc a decoded body (it would stall).
    j2m = filters[0]["typed_config"]["request_rules"]["rules"]
    j2m.append({"selectors": [{"key": "stream_options"}, {"key": "include_usage"}],
                "on_present": {"metadata_namespace": "nexus.request", "key": "usage_requested"},
                "on_missing": {"metadata_namespace": "nexus.request", "key": "usage_requested",
                               "value": False}})
    ext = next(i for i, f in enumerate(filters) if f["name"] == _EXT_PROC)
    # Response filters run in reverse: json_to_metadata's response rules first (see json_response_filter), the
    # decompressors, then sse_to_metadata (which reads the usage chunk), then the Lua filter (which hides it), then
    # ext_proc.
    lua = [hide_usage_filter()] if hide_usage_in == "envoy" else []
    filters = [*filters[:ext + 1], *lua, _sse_filter(), *filters[ext + 1:], *decompressor_filters(),
               json_response_filter()]
    return [hidden, fast, *rest], filters


def hide_usage_filter() -> dict[str, Any]:
    """The Lua filter that hides the usage chunk the server asked for (envoy/lua/hide_usage.lua); it does nothing
    on a route that does not name its code."""
    return {"name": _LUA, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "source_codes": {"hide_usage": {"inline_string": HIDE_USAGE_LUA.read_text()}}}}


def _json_response_rules() -> dict[str, Any]:
    return {"rules": _json_usage_rules(),
            "allow_content_types": ["application/json", "application/json; charset=utf-8"]}


def _sse_filter() -> dict[str, Any]:
    return {"name": _SSE, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
        "response_rules": {
            # Responses' `response.completed` carries the whole answer: an event may be large.
            "max_event_size": 1 << 20,
            "content_parser": {"name": "envoy.content_parsers.json", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.content_parsers.json.v3.JsonContentParser",
                "rules": [_usage_rule(["usage"], "usage"), _usage_rule(["response", "usage"], "usage"),
                          _usage_rule(["message", "usage"], "start_usage", first_only=True),
                          _usage_rule(["model"], "model", first_only=True),
                          _usage_rule(["message", "model"], "model", first_only=True),
                          _usage_rule(["response", "model"], "model")]}}}}}


def settlement_filters() -> list[dict[str, Any]]:
    """settlement="envoy" where ext_proc sees the response headers (Istio, Envoy Gateway, an Envoy of your own):
    the filters that read the response in its place, to go after ext_proc and before the router, in this order.
    The server turns ext_proc's response body off for each request at its response headers (mode_override), so
    no route needs changing; requests it must read itself (an OpenAI stream whose usage chunk it hides) it keeps.
    """
    return [_sse_filter(), *decompressor_filters(), json_response_filter()]


def json_response_filter() -> dict[str, Any]:
    """json_to_metadata's response rules, placed last before the router so that it reads a JSON answer first, as the
    provider sent it. After a decompressor it would hang the response: a decompressor that decoded a body ends it
    with trailers, and json_to_metadata, holding the body for its end, never completes it (measured with 1.40: a
    JSON answer gzipped against the server's `accept-encoding: identity` never reached the client). Here a
    compressed JSON answer (a provider ignoring identity) is unreadable to it, reaches the client decoded by the
    decompressors, and settles at its estimate (`nexus_envoy_reports_total{outcome="no_usage"}`)."""
    return {"name": "envoy.filters.http.json_to_metadata.response", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
        "response_rules": _json_response_rules()}}


def _reports(workers: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The gRPC access logs that report usage, and the clusters they use. A report must reach the server process
    that admitted its request (its state waits there): with several workers, one logger per worker, each taking
    only the entries whose request-phase metadata names that worker (`nexus.extproc.worker`), to a cluster of
    that worker's endpoint alone."""
    def logger(cluster: str, worker: int | None) -> dict[str, Any]:
        # Only requests the filter admitted: the server settles by their request id.
        ours = {"metadata_filter": {"matcher": {"filter": METADATA_NAMESPACE, "path": [{"key": "request_id"}],
                                                "value": {"present_match": True}}}}
        mine = {"metadata_filter": {"matcher": {"filter": METADATA_NAMESPACE, "path": [{"key": "worker"}],
                                                "value": {"double_match": {"exact": worker}}}}}
        return {"name": "envoy.access_loggers.http_grpc", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {"log_name": "nexus", "transport_api_version": "V3",
                              "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
                              "buffer_flush_interval": "0.1s", "buffer_size_bytes": 16384}},
            "filter": ours if worker is None else {"and_filter": {"filters": [ours, mine]}}}

    if workers <= 1:
        return [logger("nexus_extproc", None)], []
    names = [f"nexus_extproc_report_{i}" for i in range(workers)]
    return [logger(n, i) for i, n in enumerate(names)], names


def client_compressor() -> dict[str, Any]:
    return {"name": "envoy.filters.http.compressor", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor",
        "response_direction_config": {"common_config": {
            "content_type": ["application/json", "text/event-stream"]}},
        "compressor_library": {"name": "gzip", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip"}}}}


def _cel_call(node: int, function: str, *args: dict[str, Any]) -> dict[str, Any]:
    return {"id": node, "call_expr": {"function": function, "args": list(args)}}


def decompressor_filters() -> list[dict[str, Any]]:
    """Envoy's decompressors, each skipped for a request whose response the server reads itself (its request-phase
    metadata says `server_reads`: a stream whose added usage chunk it removes). The server asks the provider for
    identity there; one that compresses anyway then reaches the server as it was sent, and the server decodes it,
    instead of decoded by Envoy: a decompressor ends a decoded body with trailers, and ext_proc holding that body
    never completes it (measured with 1.40: the client waited until its timeout)."""
    server_reads = {"single_predicate": {
        "input": {"name": "attributes", "typed_config": {
            "@type": "type.googleapis.com/xds.type.matcher.v3.HttpAttributesCelMatchInput"}},
        "custom_match": {"name": "server_reads", "typed_config": {
            "@type": "type.googleapis.com/xds.type.matcher.v3.CelMatcher",
            # metadata.filter_metadata['nexus.extproc']['server_reads'] == true, as the parsed expression
            # (Envoy 1.40's matcher takes no expression string).
            "expr_match": {"cel_expr_parsed": {"expr": _cel_call(1, "_==_", _cel_call(
                2, "_[_]", _cel_call(3, "_[_]", {"id": 4, "select_expr": {
                    "operand": {"id": 5, "ident_expr": {"name": "metadata"}}, "field": "filter_metadata"}},
                    {"id": 6, "const_expr": {"string_value": METADATA_NAMESPACE}}),
                {"id": 7, "const_expr": {"string_value": "server_reads"}}),
                {"id": 8, "const_expr": {"bool_value": True}})}}}}}}
    skip = {"action": {"name": "skip", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}}
    return [{"name": f"envoy.filters.http.decompressor.{enc}", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
        "extension_config": {"name": f"envoy.filters.http.decompressor.{enc}", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.decompressor.v3.Decompressor",
            "decompressor_library": {"name": enc, "typed_config": {"@type": f"type.googleapis.com/{lib}"}},
            # The server decides what the provider may send (request/inbound.py): no advertising here.
            "request_direction_config": {"advertise_accept_encoding": False, "common_config": {"enabled": {
                "default_value": False, "runtime_key": f"nexus.decompressor.{enc}.request"}}}}},
        "xds_matcher": {"matcher_list": {"matchers": [{"predicate": server_reads, "on_match": skip}]}}}}
        for enc, lib in (("gzip", "envoy.extensions.compression.gzip.decompressor.v3.Gzip"),
                         ("br", "envoy.extensions.compression.brotli.decompressor.v3.Brotli"),
                         ("zstd", "envoy.extensions.compression.zstd.decompressor.v3.Zstd"))]


def _report_clusters(p: EnvoyParams, names: list[str]) -> list[dict[str, Any]]:
    out = []
    for i, name in enumerate(names):
        out.append({"name": name, "type": "STATIC", "connect_timeout": "1s",
                    "typed_extension_protocol_options": _h2_options(),
                    "load_assignment": (_pipes(name, [p.extproc_uds[i]]) if p.extproc_uds
                                        else _endpoints(name, p.extproc_host, [p.extproc_ports[i]]))})
    return out


def build_config(p: EnvoyParams) -> dict[str, Any]:
    ext_proc: dict[str, Any] = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            # A stream that cannot reach a worker (killed, or restarted and not yet listening) opens again on
            # another worker instead of failing the request: previous_hosts keeps the retry off the same one.
            # Only failures before the worker saw anything: a retried reset could reserve a request twice.
            "grpc_service": {"envoy_grpc": {"cluster_name": "nexus_extproc"}, "timeout": "10s",
                             "retry_policy": {
                                 "retry_on": "connect-failure,refused-stream",
                                 "num_retries": 2,
                                 "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.1s"},
                                 "retry_host_predicate": [{
                                     "name": "envoy.retry_host_predicates.previous_hosts",
                                     "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host"
                                                               ".previous_hosts.v3.PreviousHostsPredicate"}}],
                                 "host_selection_retry_max_attempts": 3}},
            # Fail closed: with `true`, an ext_proc outage would pass requests unpriced and unbilled.
            "failure_mode_allow": p.failure_mode_allow,
            # Default 200 ms fails 100 KB prompts under load; counting them takes a few ms plus queueing.
            "message_timeout": p.message_timeout,
            "max_message_timeout": "30s",
            "allow_mode_override": True,
            # Envoy drops dynamic metadata from the server unless its namespace is listed here.
            "metadata_options": {"receiving_namespaces": {"untyped": ["nexus.extproc"]}},
            "processing_mode": _mode("SKIP", "BUFFERED") if p.skip_response_headers else _mode("SEND", "BUFFERED"),
        },
    }
    if p.skip_response_headers:
        # The status of a response whose headers are not sent: it comes with the first body message.
        ext_proc["typed_config"]["response_attributes"] = ["response.code"]
        ext_proc["typed_config"]["metadata_options"]["forwarding_namespaces"] = {
            "untyped": [RESPONSE_METADATA_NAMESPACE]}
    route_action = {"cluster_header": "x-nexus-upstream", "timeout": p.upstream_timeout, "auto_host_rewrite": True}
    # The cluster is chosen by then: the provider never sees our routing header.
    routes: list[dict[str, Any]] = [{"match": {"prefix": "/"}, "route": route_action,
                                     "request_headers_to_remove": ["x-nexus-upstream"]}]
    filters: list[dict[str, Any]] = [ext_proc]
    if p.skip_response_headers:
        # The content-encoding of a response whose headers the server does not see: set before ext_proc's
        # response side runs (response filters run in reverse), forwarded with the first body message.
        filters.append({"name": "envoy.filters.http.header_to_metadata", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
            "response_rules": [{"header": "content-encoding", "on_header_present": {
                "metadata_namespace": RESPONSE_METADATA_NAMESPACE, "key": "content_encoding", "type": "STRING"}}]}})
    if p.skip_response_headers:
        headers_to_add = [{"header": {"key": h, "value": f"%DYNAMIC_METADATA(nexus.extproc:{h})%"},
                           "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"} for h in NEXUS_RESPONSE_HEADERS]
        stream = {"match": {"prefix": "/", "dynamic_metadata": [{"filter": "nexus.request", "path": [{"key": "stream"}],
                                                                  "value": {"bool_match": True}}]},
                  "route": route_action, "request_headers_to_remove": ["x-nexus-upstream"],
                  # A stream request's response goes to the server chunk by chunk (it may drop the usage
                  # chunk it asked for on the client's behalf); decided before ext_proc's first message.
                  "typed_per_filter_config": {_EXT_PROC: {
                      "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                      "overrides": {"processing_mode": _mode("SKIP", "STREAMED")}}}}
        routes = [stream, *routes]
        for r in routes:
            r["response_headers_to_add"] = headers_to_add
        # Reads `stream` from a JSON request body before ext_proc's first message, so the route above (and its
        # processing mode) is known when the exchange starts. A body it cannot read takes the default route.
        filters.insert(0, {"name": "envoy.filters.http.json_to_metadata", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
            "request_rules": {"rules": [{"selectors": [{"key": "stream"}],
                                         "on_present": {"metadata_namespace": "nexus.request", "key": "stream"}}],
                              "allow_content_types": ["application/json", "application/json; charset=utf-8"]}}})
    access_logs: list[dict[str, Any]] = []
    report_clusters: list[str] = []
    if p.settlement == "envoy" and not p.skip_response_headers:
        filters = [*filters[:1], *settlement_filters(), *filters[1:]]  # ext_proc first: see settlement_filters
    elif p.settlement == "envoy":
        # With a visible usage chunk nothing is hidden: no route for it, and no Lua filter in the chain.
        hide = p.hide_usage_in if p.stream_usage == "hidden" else "nobody"
        routes, filters = _envoy_settles(routes, filters, hide)
        if p.stream_usage == "visible":
            routes = routes[1:]  # no stream needs the server to hide its usage chunk
    if p.settlement == "envoy":
        access_logs, report_clusters = _reports(len(p.extproc_uds or p.extproc_ports) if p.reports_per_worker else 1)
    if p.settlement == "envoy":  # the server's `auto` reads each stream's response or waits for the report
        ext_proc["typed_config"]["grpc_service"]["initial_metadata"] = [{"key": "x-nexus-settlement", "value": "envoy"}]
        # No route of this Envoy sends the server a response message (so it reads none).
        if p.skip_response_headers and (p.hide_usage_in == "envoy" or p.stream_usage == "visible"):
            ext_proc["typed_config"]["grpc_service"]["initial_metadata"].append(
                {"key": "x-nexus-usage-hidden-by", "value": "envoy"})
    if p.compress_to_client:
        filters.insert(0, client_compressor())
    if p.envoy_token:
        token = [{"key": "x-nexus-envoy-token", "value": p.envoy_token}]
        ext_proc["typed_config"]["grpc_service"].setdefault("initial_metadata", []).extend(token)
        for log_cfg in access_logs:
            log_cfg["typed_config"]["common_config"]["grpc_service"]["initial_metadata"] = token
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "llm",
        "codec_type": "AUTO",
        "stream_idle_timeout": "300s",
        "request_timeout": "0s",
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": p.access_log_path, "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}}}},
            *access_logs],
        "local_reply_config": local_reply_config(),
        "route_config": {"name": "llm", "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": routes,
                                                           "request_body_buffer_limit": p.request_body_limit}]},
        "http_filters": [*filters, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    extproc_cluster = {
        "name": "nexus_extproc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": _h2_options(),
        "circuit_breakers": _THRESHOLDS,
        "load_assignment": (_pipes("nexus_extproc", p.extproc_uds) if p.extproc_uds
                            else _endpoints("nexus_extproc", p.extproc_host, p.extproc_ports)),
        # no_traffic_interval too: Envoy otherwise checks every 60 s until it counts the cluster as used, and a
        # worker that reports NOT_SERVING before it recycles would keep getting new streams.
        "health_checks": [{"timeout": "1s", "interval": "2s", "no_traffic_interval": "2s", "unhealthy_threshold": 2,
                           "healthy_threshold": 1,
                           "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"}}],
        # A worker that died (and is being restarted) refuses connections: eject it on the first refusal
        # instead of waiting two health-check intervals; at most half the workers at once. It comes back on its
        # first passing health check (successful_active_health_check_uneject_host, on by default), not when a
        # fixed ejection ends: a restarted worker took 3.0 s to listen on a loaded 2-core machine, and with a
        # 2 s ejection the streams Envoy sent it in between failed with 500.
        "outlier_detection": {"split_external_local_origin_errors": True,
                              "consecutive_local_origin_failure": 1,
                              "enforcing_consecutive_local_origin_failure": 100,
                              "interval": "1s", "base_ejection_time": "30s", "max_ejection_percent": 50},
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p.admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "llm",
                "address": {"socket_address": {"address": p.listen_address, "port_value": p.listen_port}},
                "per_connection_buffer_limit_bytes": CONNECTION_BUFFER,
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }],
            "clusters": [extproc_cluster, *_report_clusters(p, report_clusters),
                         *(_upstream_cluster(u, p.local_health_interval) for u in p.upstreams)],
        },
    }


def plain_config(listen_port: int, admin_port: int, upstream_port: int) -> dict[str, Any]:
    """The same listener with the ext_proc filter removed: the benchmark's baseline."""
    cfg = build_config(EnvoyParams(listen_address="127.0.0.1", listen_port=listen_port, admin_port=admin_port,
                                   upstreams=[Upstream("openai", "127.0.0.1", upstream_port)],
                                   access_log_path="/dev/null"))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [{"match": {"prefix": "/"},
                                                          "route": {"cluster": "openai", "timeout": "600s"}}]
    cfg["static_resources"]["clusters"] = cfg["static_resources"]["clusters"][1:]
    return cfg


def dump(cfg: dict[str, Any]) -> str:
    header = "# Generated by `python -m nexus_dev.envoy_config`; edit nexus_dev/envoy_config.py instead.\n"
    return header + yaml.safe_dump(cfg, sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(dump(build_config(EnvoyParams())))
